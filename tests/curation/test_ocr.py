"""OcrStage: text area from PP-OCR detection on burned-in text, clean images and real media."""

from __future__ import annotations

import pickle
import re
import sys
import types
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from curation.config import CurationConfig
from curation.media import fit_max_side
from curation.stages.base import MissingWeights, check_required
from curation.stages.ocr import OcrStage, union_mask

DATA = Path(__file__).resolve().parent.parent / "data"
NATURAL_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png")
CLEAN_MAX_AREA = 0.005  # "no text": below half a percent of the frame


def image_row(path: Path) -> dict:
    rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return {
        "kind": "image",
        "status": "accepted",
        "frames": [fit_max_side(rgb)],
        "frame_times": [0.0],
    }


def video_row(path: Path, times: list[float]) -> dict:
    """Frames nearest to ``times`` (seconds), as the frames stage delivers them."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        pts = np.array([float(f.pts * stream.time_base) for f in decoded])
        picked = [decoded[int(np.argmin(np.abs(pts - t)))] for t in times]
        return {
            "kind": "video",
            "status": "accepted",
            "frames": [fit_max_side(f.to_ndarray(format="rgb24")) for f in picked],
            "frame_times": [float(f.pts * stream.time_base) for f in picked],
        }


def box_mask(
    shape: tuple[int, ...], boxes: list[list[int]], scale: float, pad: int = 0
) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        x0, y0 = int(x0 * scale) - pad, int(y0 * scale) - pad
        x1, y1 = int(np.ceil(x1 * scale)) + pad, int(np.ceil(y1 * scale)) + pad
        mask[max(0, y0) : y1, max(0, x0) : x1] = True
    return mask


@pytest.fixture(scope="module")
def labelled(corpus):
    """(root, the corpus labels by id)."""
    root, labels = corpus
    return root, {lab["id"]: lab for lab in labels}


@pytest.fixture(scope="module")
def ocr():
    stage = OcrStage(CurationConfig().ocr)
    stage.setup()
    return stage


def test_text_images_are_positive_where_the_text_is(labelled, ocr):
    root, labels = labelled
    text_images = [lab for lab in labels.values() if lab["kind"] == "image" and lab["has_text"]]
    assert len(text_images) >= 3
    for lab in text_images:
        row = image_row(root / lab["path"])
        out = ocr.process_row(row)
        assert out["ocr_area"] > 0.02, lab["id"]
        assert out["ocr_boxes"] >= len(lab["text"]), lab["id"]

        frame = row["frames"][0]
        detected = union_mask(frame.shape, ocr.detect(frame))
        scale = frame.shape[1] / lab["width"]
        for box in lab["text_boxes"]:  # every labelled line is found ...
            covered = detected[box_mask(frame.shape, [box], scale)].mean()
            assert covered > 0.7, (lab["id"], box, covered)
        # ... and detections lie on labelled text (or on the watermark, also text to OCR)
        allowed = lab["text_boxes"] + ([lab["watermark_box"]] if lab["watermark_text"] else [])
        inside = box_mask(frame.shape, allowed, scale, pad=12)
        assert detected[inside].sum() / detected.sum() > 0.9, lab["id"]


def test_clean_images_and_natural_photos_are_negative(labelled, ocr):
    root, labels = labelled
    clean = [
        root / lab["path"]
        for lab in labels.values()
        if lab["kind"] == "image"
        and lab["expect"] == "valid"
        and not lab["has_text"]
        and not lab["has_watermark"]
    ]
    assert len(clean) >= 6
    for path in clean + [DATA / name for name in NATURAL_PHOTOS]:
        out = ocr.process_row(image_row(path))
        assert out["ocr_area"] < CLEAN_MAX_AREA, (path.name, out)
        assert out["ocr_boxes"] == 0, (path.name, out)


def test_counter_video_is_positive_on_every_frame(ocr):
    row = video_row(DATA / "counter.mp4", [0.0, 1.0, 2.0, 2.9])
    for data in row["frames"]:
        frame = data
        polys = ocr.detect(frame)
        assert len(polys) == 2  # "Frame = N" and "PTS = Ts", bottom right
        assert union_mask(frame.shape, polys).mean() > 0.02
    out = ocr.process_row(row)
    assert out["ocr_boxes"] == 2 and 0.02 < out["ocr_area"] < 0.2


def test_subtitles_are_found_in_their_segment(labelled, ocr):
    root, labels = labelled
    lab = labels["subtitles_480x270.mp4"]
    segments = lab["text_segments"][::2]
    row = video_row(root / lab["path"], [(s["start_s"] + s["end_s"]) / 2 for s in segments])
    for data, seg in zip(row["frames"], segments, strict=True):
        frame = data
        detected = union_mask(frame.shape, ocr.detect(frame))
        assert detected.mean() > 0.01, seg["text"]
        assert detected[box_mask(frame.shape, [seg["box"]], 1.0)].mean() > 0.7, seg["text"]
    assert ocr.process_row(row)["ocr_boxes"] == 1


def test_box_count_and_max_over_frames(ocr):
    def card(lines: list[str]) -> np.ndarray:
        img = np.full((360, 640, 3), (40, 70, 110), np.uint8)
        img[:, :, 1] = np.linspace(50, 120, 640, dtype=np.uint8)[None, :]
        for i, text in enumerate(lines):
            y = 70 + i * 100
            cv2.putText(
                img, text, (60, y), cv2.FONT_HERSHEY_SIMPLEX, 1.4, (255, 255, 255), 3, cv2.LINE_AA
            )
        return img

    blank, one, three = (
        card([]),
        card(["OPEN DAILY"]),
        card(["NIGHT MARKET", "FRIDAY 9PM", "ALL WELCOME"]),
    )
    assert len(ocr.detect(blank)) == 0
    assert len(ocr.detect(one)) == 1
    assert len(ocr.detect(three)) == 3
    frames = [f for f in (blank, three, one)]
    out = ocr.process_row({"kind": "video", "frames": frames, "frame_times": [0.0, 1.0, 2.0]})
    assert out["ocr_boxes"] == 3
    assert out["ocr_area"] == pytest.approx(union_mask(three.shape, ocr.detect(three)).mean())
    assert ocr.process_row({"kind": "image", "frames": frames[:1]})["ocr_area"] == 0.0


def test_row_without_frames_is_an_error(ocr):
    (out,) = ocr.process_batch([{"kind": "image", "status": "accepted", "frames": []}])
    assert out["status"] == "error" and out["reasons"][0].startswith("no_frames")


def test_stage_declaration_pickling_and_required_files():
    stage = OcrStage(CurationConfig().ocr)
    assert (stage.name, stage.resources.cpus, stage.uses_model) == ("ocr", 0.5, True)
    (required,) = stage.required_files()  # the det model shipped in the rapidocr wheel
    assert required.path.is_file() and required.path.suffix == ".onnx"
    check_required([stage])
    stage.setup()
    clone = pickle.loads(pickle.dumps(stage))
    assert clone._detector is None


# --- paddleocr engine: optional, not installed here; only its failure paths and adapter ---


def paddle_cfg(model_dir: Path) -> CurationConfig:
    return CurationConfig(ocr={"engine": "paddleocr", "model_dir": str(model_dir)})


def fake_paddle_model(model_dir: Path, name: str = "PP-OCRv5_mobile_det") -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "inference.yml").write_text(f"Global:\n  model_name: {name}\n")
    (model_dir / "inference.pdiparams").write_bytes(b"\0")
    (model_dir / "inference.json").write_text("{}")
    return model_dir


def test_paddleocr_without_model_dir_files_fails_at_startup(tmp_path):
    stage = OcrStage(paddle_cfg(tmp_path / "det").ocr)
    assert {f.path.name for f in stage.required_files()} == {"inference.yml", "inference.pdiparams"}
    with pytest.raises(MissingWeights, match=re.escape(str(tmp_path / "det"))):
        check_required([stage])
    with pytest.raises(MissingWeights, match=r"does not hold a PaddleOCR text-detection model"):
        stage.setup()


def test_paddleocr_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # import paddleocr -> ImportError
    stage = OcrStage(paddle_cfg(fake_paddle_model(tmp_path / "det")).ocr)
    check_required([stage])
    with pytest.raises(RuntimeError, match=r"omniforge\[paddle\]") as err:
        stage.setup()
    assert not isinstance(err.value, MissingWeights)


def test_paddleocr_2x_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "paddleocr", types.SimpleNamespace(__version__="2.7.3"))
    stage = OcrStage(paddle_cfg(fake_paddle_model(tmp_path / "det")).ocr)
    with pytest.raises(RuntimeError, match=r"paddleocr>=3"):
        stage.setup()


def test_paddleocr_text_detection_adapter(tmp_path, monkeypatch):
    """The documented 3.x call: TextDetection(model_name, model_dir, ...).predict(img) ->
    results with dt_polys / dt_scores. A stand-in returns the subtitle-like box of a card."""
    calls = {}

    class TextDetection:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def predict(self, img, batch_size=1):
            calls["shape"] = img.shape
            polys = np.array([[[60, 40], [420, 40], [420, 90], [60, 90]]], np.int16)
            return [{"dt_polys": polys, "dt_scores": [0.9]}]

    monkeypatch.setitem(
        sys.modules, "paddleocr", types.SimpleNamespace(TextDetection=TextDetection)
    )
    model_dir = fake_paddle_model(tmp_path / "det", name="PP-OCRv5_server_det")
    stage = OcrStage(paddle_cfg(model_dir).ocr)
    img = np.full((360, 640, 3), 90, np.uint8)
    cv2.putText(img, "HELLO THERE", (70, 80), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 3)
    out = stage.process_row({"kind": "image", "frames": [img]})
    assert calls["init"]["model_name"] == "PP-OCRv5_server_det"
    assert calls["init"]["model_dir"] == str(model_dir)
    assert calls["init"]["device"] == "cpu"
    assert calls["shape"] == (360, 640, 3)
    assert out["ocr_boxes"] == 1
    assert out["ocr_area"] == pytest.approx(361 * 51 / (640 * 360), rel=0.05)
