"""GradualDetector: dissolves and fades between real shots, none on single shots with motion.

The shots are the real fixtures: cockatoo (first 9 s, 20 fps) and realshort (1.2 s at 30 fps,
taken at 20 fps and played forward then backward for length). The tests encode each edit to
H.264, decode it at the scene scan's detection width and feed the detector as the scan does.
"""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from edits import FPS, H, W, decoded, dip, dissolve, fit, real_shots

from curation.sample_data.videos import encode_video
from curation.scan import detection_size
from curation.transitions import GradualDetector, Transition

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def shots() -> tuple[list[np.ndarray], list[np.ndarray]]:
    return real_shots()


def detect(frames: list[np.ndarray], tmp_path: Path, fps: int = FPS) -> list[Transition]:
    """Encode, decode at the detection width (as the scan does), run the detector."""
    path = tmp_path / "edit.mp4"
    encode_video(path, iter(frames), frames[0].shape[1], frames[0].shape[0], fps)
    detector = GradualDetector(fps)
    found: list[Transition] = []
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            small = frame.reformat(*detection_size(frame.width, frame.height))
            found += detector(i, small.to_ndarray(format="bgr24"))
    return found + detector.finish()


# Lengths of the test transitions in frames at FPS (0.5-2 s of video), and how near their
# middle they must be cut: the 0.6 s of video, in frames. Media time, not run time.
LENGTHS = [10, 20, 30, 40]
NEAR = round(0.6 * FPS)
SLACK = round(0.3 * FPS)  # frames too faint a mix to tell, at either edge of a dissolve


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("order", ["cockatoo_first", "realshort_first"])
def test_cross_dissolve_between_real_shots_is_found_near_its_middle(shots, tmp_path, order, n):
    cockatoo, realshort = shots
    if order == "cockatoo_first":
        at, frames = 60, dissolve(cockatoo, realshort, 60, n)
    else:
        at, frames = 50, dissolve(realshort, cockatoo[40:], 50, n)
    (found,) = detect(frames, tmp_path)
    middle = at + n / 2
    assert found.kind == "dissolve"
    assert abs(found.cut - middle) <= NEAR, (found, middle)
    # the frames dropped are the transition's, give or take the mixes too faint to tell
    assert found.start <= found.cut < found.end
    assert at - SLACK <= found.start and found.end <= at + n + SLACK, found


@pytest.mark.parametrize("n", LENGTHS)
def test_dip_to_black_between_real_shots_is_one_fade_cut_in_the_black(shots, tmp_path, n):
    cockatoo, realshort = shots
    (found,) = detect(dip(cockatoo, realshort, 60, n), tmp_path)
    assert found.kind == "fade"
    assert abs(found.cut - (60 + n / 2)) <= NEAR, found
    if n >= 20:  # (at 10 frames each half is shorter than the shortest window, 8 frames)
        assert found.start < 60 + n // 2 < found.end, found  # the black is dropped


def test_flat_colour_fades(tmp_path):
    """fades.mp4 (PySceneDetect's test video, 25 fps): in from black, then two dips through
    black (at 3.36 s and 6.72 s) between flat grey and white."""
    found = detect(decoded(DATA / "fades.mp4"), tmp_path, fps=25)
    assert [t.kind for t in found] == ["fade"] * 3
    assert [round(t.cut / 25, 1) for t in found][1:] == pytest.approx([3.3, 6.6], abs=0.3)


REAL_FPS = {"cockatoo_9s.mp4": 20, "cockatoo_tail.mp4": 20, "realshort.mp4": 30, "counter.mp4": 10}


@pytest.mark.parametrize("name", sorted(REAL_FPS))
def test_no_transition_in_real_single_shots(tmp_path, name):
    """cockatoo_tail.mp4 is the fixture's 8-14 s at 640x360: at 9.4 s the bird starts to
    move after a pause, a change over 0.4 s that stands out from both sides as a short
    dissolve's does (it passed before dissolves had to halve the picture's detail)."""
    frames = decoded(DATA / name)
    fps = REAL_FPS[name]
    assert detect(frames, tmp_path, fps) == []


def _photo(name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(DATA / name)), cv2.COLOR_BGR2RGB)


def pan(photo: np.ndarray, px: int, n: int = 100) -> list[np.ndarray]:
    """A viewport sliding ``px`` pixels a frame across the photo (scaled to fit the path)."""
    h, w = photo.shape[:2]
    s = max(H / h, (W + px * n) / w)
    big = cv2.resize(photo, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    return [np.ascontiguousarray(big[:H, i * px : i * px + W]) for i in range(n)]


def zoom(photo: np.ndarray, n: int = 100) -> list[np.ndarray]:
    """A steady zoom into the middle, to a third of the picture."""
    base = fit(photo)
    out = []
    for i in range(n):
        s = 1.0 - 0.66 * i / (n - 1)
        cw, ch = round(W * s), round(H * s)
        x, y = (W - cw) // 2, (H - ch) // 2
        out.append(cv2.resize(base[y : y + ch, x : x + cw], (W, H), interpolation=cv2.INTER_LINEAR))
    return out


def test_no_transition_on_pans_zooms_fast_motion_or_a_flash(shots, tmp_path):
    cockatoo, _ = shots
    flash = [f.copy() for f in cockatoo[:120]]
    for i in (60, 61):  # a camera flash: two frames washed out
        flash[i] = cv2.addWeighted(flash[i], 0.3, np.full_like(flash[i], 255), 0.7, 0)
    cases = {
        "pan": pan(_photo("coffee.png"), 3),
        "fast pan": pan(_photo("astronaut.png"), 12),
        "zoom": zoom(_photo("chelsea.png")),
        "flash": flash,
    }
    found = {name: detect(frames, tmp_path) for name, frames in cases.items()}
    assert found == {name: [] for name in cases}


def test_reported_within_its_delay():
    """The scan keeps frames until no boundary can still be reported before them: each
    transition must come back at most ``delay`` frames after its last frame."""
    fps = 20
    det = GradualDetector(fps)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 255, (2, 36, 64, 3)).astype(np.float32)
    for i in range(200):
        t = min(1.0, max(0.0, (i - 80) / 20))
        frame = ((1 - t) * a + t * b).astype(np.uint8)
        found = det(i, frame)
        if found:
            (tr,) = found
            assert i - tr.end <= det.delay
            break
    else:
        pytest.fail("the dissolve was not reported while frames were fed")
