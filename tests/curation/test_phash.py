"""pHash of real fixture media: copies that were re-encoded, resized or slightly cropped stay a
few bits apart; different pictures and different parts of one picture do not."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import imagehash
import numpy as np
import pytest
from PIL import Image

from curation.dedup import find_duplicates
from curation.stages.phash import PerceptualHashStage, hamming, phash

DATA = Path(__file__).resolve().parents[1] / "data"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "camera.png")
NEAR = 10  # bits of 64: the copies below stay within this; distinct pictures are ~32 apart


def rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(DATA / name).convert("RGB"))


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


def copies(image: np.ndarray) -> dict[str, np.ndarray]:
    h, w = image.shape[:2]
    dy, dx = h // 50, w // 50  # 2 % off every side (pHash moves ~3 bits a percent of crop)
    half = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return {
        "jpeg q35": jpeg(image, 35),
        "half size": half,
        "half size, jpeg q60": jpeg(half, 60),
        "cropped 2 % a side": np.ascontiguousarray(image[dy : h - dy, dx : w - dx]),
        "cropped 5 % on the left": np.ascontiguousarray(image[:, w // 20 :]),
    }


def test_the_hash_is_imagehash_phash():
    image = rgb("coffee.png")
    assert f"{phash(image):016x}" == str(imagehash.phash(Image.fromarray(image)))


@pytest.mark.parametrize("name", PHOTOS)
def test_copies_of_a_real_photo_stay_near_and_other_photos_far(name):
    original = phash(rgb(name))
    for what, copy in copies(rgb(name)).items():
        assert hamming(original, phash(copy)) <= NEAR, what
    for other in PHOTOS:
        if other != name:
            assert hamming(original, phash(rgb(other))) > 2 * NEAR, other


def test_two_parts_of_one_photo_are_not_duplicates():
    image = rgb("astronaut.png")
    left, right = image[:, :256], image[:, 256:]
    top, bottom = image[:256], image[256:]
    assert hamming(phash(np.ascontiguousarray(left)), phash(np.ascontiguousarray(right))) > 2 * NEAR
    assert hamming(phash(np.ascontiguousarray(top)), phash(np.ascontiguousarray(bottom))) > 2 * NEAR


def video_frames(path: Path, at: list[float], size: tuple[int, int] | None = None):
    """RGB frames nearest to the times ``at`` (seconds), optionally resized."""
    frames, wanted = [], list(at)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if wanted and frame.time >= wanted[0] - 1e-6:
                image = frame.to_ndarray(format="rgb24")
                if size:
                    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                frames.append(image)
                wanted.pop(0)
    return frames


def reencode(src: Path, dst: Path, width: int, height: int, crf: int) -> Path:
    """A lower-resolution H.264 copy, as a re-upload would be."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=inp.streams.video[0].average_rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in inp.decode(video=0):
            image = cv2.resize(frame.to_ndarray(format="rgb24"), (width, height))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return dst


def test_a_reencoded_real_clip_hashes_like_the_original_and_other_moments_do_not(tmp_path):
    source = DATA / "cockatoo_9s.mp4"
    copy = reencode(source, tmp_path / "copy.mp4", 480, 270, crf=32)
    times = [0.5, 2.0, 4.0, 6.5, 8.5]
    stage = PerceptualHashStage()
    a = stage.process_row({"frames": video_frames(source, times)})["phash"]
    b = stage.process_row({"frames": video_frames(copy, times)})["phash"]
    assert len(a) == len(b) == len(times)
    assert max(hamming(x, y) for x, y in zip(a, b, strict=True)) <= NEAR
    # the same shot a few seconds apart is a different picture, not a duplicate
    assert min(hamming(a[i], a[j]) for i in range(5) for j in range(5) if i < j) > NEAR
    # curate dedup's decision on these rows: the re-encoded copy and a copy cropped by 2 % a
    # side repeat the original; the same scene half a second later does not
    cropped = [f[14:-14, 26:-26] for f in video_frames(source, times)]  # 2 % of 1280 x 720
    later = video_frames(source, [t + 0.5 for t in times])
    rows = [
        {"key": "original", "kind": "video", "phash": a, "width": 1280, "height": 720},
        {"key": "reencoded", "kind": "video", "phash": b, "width": 480, "height": 270},
        {"key": "cropped", "kind": "video", **stage.process_row({"frames": cropped})},
        {"key": "later", "kind": "video", **stage.process_row({"frames": later})},
    ]
    marks = find_duplicates(rows, max_bits=NEAR)
    assert {k: m.kept for k, m in marks.items()} == {"reencoded": "original", "cropped": "original"}


def test_rows_without_frames_get_no_hash():
    out = PerceptualHashStage().process_row({"kind": "image", "frames": None})
    assert out["phash"] is None and out["target_phash"] is None
