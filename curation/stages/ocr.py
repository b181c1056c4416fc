"""Burned-in text: how much of a frame text covers, from PP-OCR text *detection* (no recognition).

Per frame, the detected text regions (4-point polygons) are rasterised into one mask;
``ocr_area`` = mask pixels / frame pixels (the area of the union of the boxes, 0-1) and
``ocr_boxes`` = number of boxes, each the maximum over the sampled frames. Stills have one frame;
edit pairs are scored on both sides (``frames`` and ``target_frames``; max over all).

Engines (``ocr.engine``):

- ``rapidocr`` (default): RapidOCR 3.x running the PP-OCR det ONNX model shipped in its wheel
  on onnxruntime (CPU, one thread per actor; its CUDA provider on a GPU worker when the
  ``onnxruntime-gpu`` build is installed, see ``onnx_cuda_available``). ``required_files``
  names that model so a broken install fails at start-up instead of RapidOCR trying to
  download it on a worker.
- ``paddleocr``: PaddleOCR 3.x ``TextDetection`` (optional extra ``omniforge[paddle]`` plus
  ``paddlepaddle``) on the PP-OCR det inference model in ``ocr.model_dir``.

Which detections count as text. The detector's probability map also fires on text-free
content: the shipped PP-OCRv6 small det model returns frame-filling blobs on smooth regions
(synthetic skies, a coffee cup, parts of real footage) and boxes on flat shapes and logos.
Measured on the sample corpus (seeds 0-2, stills, edits and videos) and the real photos and
videos of the test fixtures: real text lines score >= 0.75 (mean map probability in the box),
have a Canny edge density >= 0.075 in the box (0.034 for a 160 px high line on a 360 px frame)
and are at most 0.18 of the frame's short side high (0.49 for that giant line). Every false
detection but a logo scores < 0.6, or has an edge density <= 0.018 (blobs, flat shapes), or is
0.5-1.0 of the frame's short side high (the coffee-cup blob: score 0.69, edge density 0.076).
A box is therefore kept when ``score >= BOX_THRESH``, ``edge density >= MIN_EDGE_DENSITY``
(text has strokes) and ``height <= MAX_LINE_HEIGHT x frame short side``, whatever the engine.
Known limits: a logo can pass as text (the shape-only watermark logo of the sample corpus: one
box, area ~0.04); a single text line taller than half the frame is dropped; the thresholds were
set on the data above, which the tests also use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from curation.config import OcrConfig
from curation.media import FRAME_MAX_SIDE, as_frames
from curation.weights import WORKER_BASE_MB, memory_estimate_mb

from .base import LocalWeights, MissingWeights, Resources, Row, SampleError, Stage

OCR_COLUMNS = ("ocr_area", "ocr_boxes")

BOX_THRESH = 0.6  # mean text probability inside a box (RapidOCR's default is 0.5)
MIN_EDGE_DENSITY = 0.025  # share of Canny edge pixels inside a box
MAX_LINE_HEIGHT = 0.5  # box height (short side of its min-area rectangle) / frame short side
CANNY_THRESHOLDS = (100, 200)

PADDLE_EXTRA_HINT = (
    "ocr.engine 'paddleocr' needs the optional PaddleOCR extra: "
    "pip install 'omniforge[paddle]' plus paddlepaddle for your platform "
    "(https://www.paddlepaddle.org.cn/en/install), or use ocr.engine 'rapidocr'"
)
PADDLE_MODEL_HINT = (
    "download a PP-OCR text-detection inference model (e.g. PP-OCRv5_mobile_det_infer.tar "
    "from the PaddleOCR model list) and extract it so that ocr.model_dir holds inference.yml, "
    "inference.pdiparams and inference.json (or inference.pdmodel)"
)
PADDLE_GRAPH_FILES = ("inference.json", "inference.pdmodel")
RAPID_HOW = "it ships in the rapidocr wheel: pip install --force-reinstall 'rapidocr>=3,<4'"


def onnx_cuda_available() -> bool:
    """Whether onnxruntime here can run on CUDA (the onnxruntime-gpu build is installed)."""
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except Exception:
        return False


def _rapidocr_params(model_path: Path | None = None, cuda: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {
        "Global.use_det": True,
        "Global.use_cls": False,
        "Global.use_rec": False,
        "Global.log_level": "error",  # no "detection result is empty" warning per text-free frame
        # Frames are already <= FRAME_MAX_SIDE: "max" never upscales them (the default "min" 736
        # does, which is 2-5x slower and produced more false detections on the sample corpus).
        "Det.limit_type": "max",
        "Det.limit_side_len": FRAME_MAX_SIDE,
        "Det.box_thresh": BOX_THRESH,
        # One thread per actor: the pool scales with actors, and 1 thread was also the fastest
        # setting measured on a 2-CPU machine.
        "EngineConfig.onnxruntime.intra_op_num_threads": 1,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
    }
    if model_path is not None:
        params["Det.model_path"] = str(model_path)
    if cuda:
        params["EngineConfig.onnxruntime.use_cuda"] = True
    return params


def rapidocr_det_model() -> Path | None:
    """Where RapidOCR's default det model lives (shipped in its wheel); None if unresolvable.

    Resolved through RapidOCR's own model table so it follows the installed version.
    """
    try:
        from rapidocr import RapidOCR
        from rapidocr.inference_engine.base import FileInfo, InferSession

        cfg = RapidOCR(params=_rapidocr_params()).cfg  # parses config only; models load lazily
        det = cfg.Det
        info = InferSession.get_model_url(
            FileInfo(
                engine_type=det.engine_type,
                ocr_version=det.ocr_version,
                task_type=det.task_type,
                lang_type=det.lang_type,
                model_type=det.model_type,
            )
        )
        return Path(cfg.Global.model_root_dir) / Path(info["model_dir"]).name
    except Exception:
        return None


def paddle_model_name(model_dir: Path) -> str:
    """Check a PaddleOCR 3 det model dir; return the model name recorded in inference.yml."""
    import yaml

    missing = [p for p in ("inference.yml", "inference.pdiparams") if not (model_dir / p).is_file()]
    if not any((model_dir / g).is_file() for g in PADDLE_GRAPH_FILES):
        missing.append(" or ".join(PADDLE_GRAPH_FILES))
    if missing:
        raise MissingWeights(
            f"ocr.model_dir {model_dir} does not hold a PaddleOCR text-detection model "
            f"(missing {', '.join(missing)}); {PADDLE_MODEL_HINT}"
        )
    with (model_dir / "inference.yml").open(encoding="utf-8") as f:
        meta = yaml.safe_load(f) or {}
    name = (meta.get("Global") or {}).get("model_name") if isinstance(meta, dict) else None
    if not name:
        raise MissingWeights(
            f"{model_dir / 'inference.yml'} names no Global.model_name; {PADDLE_MODEL_HINT}"
        )
    return str(name)


class _RapidDetector:
    def __init__(self, cuda: bool = False) -> None:
        from rapidocr import RapidOCR

        model = rapidocr_det_model()
        if model is not None and not model.is_file():  # else RapidOCR would try to download it
            raise MissingWeights(f"RapidOCR text-detection model not found at {model}; {RAPID_HOW}")
        self._engine = RapidOCR(params=_rapidocr_params(model, cuda))
        self(np.zeros((64, 64, 3), np.uint8))  # load the ONNX session now, not on the 1st sample

    def __call__(self, bgr: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
        res = self._engine(bgr, use_det=True, use_cls=False, use_rec=False)
        boxes = getattr(res, "boxes", None)
        if boxes is None or len(boxes) == 0:
            return [], []
        return [np.asarray(b, np.float32) for b in boxes], [float(s) for s in res.scores]


class _PaddleDetector:
    def __init__(self, model_dir: Path | None, device: str = "cpu") -> None:
        if model_dir is None:
            raise MissingWeights(f"ocr.model_dir is not set; {PADDLE_MODEL_HINT}")
        model_name = paddle_model_name(Path(model_dir))
        try:
            import paddleocr
        except ImportError as e:
            raise RuntimeError(f"{PADDLE_EXTRA_HINT} ({e})") from e
        text_detection = getattr(paddleocr, "TextDetection", None)
        if text_detection is None:
            version = getattr(paddleocr, "__version__", "?")
            raise RuntimeError(
                f"ocr.engine 'paddleocr' uses the PaddleOCR 3.x TextDetection API; the installed "
                f"paddleocr {version} has none: pip install -U 'paddleocr>=3'"
            )
        try:
            self._model = text_detection(
                model_name=model_name,
                model_dir=str(model_dir),
                device="gpu" if device == "cuda" else "cpu",
                cpu_threads=1,
                limit_side_len=FRAME_MAX_SIDE,
                limit_type="max",
                box_thresh=BOX_THRESH,
            )
        except (ImportError, RuntimeError) as e:  # paddlepaddle missing: DependencyError
            raise RuntimeError(f"{PADDLE_EXTRA_HINT} ({type(e).__name__}: {e})") from e

    def __call__(self, bgr: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
        (res,) = self._model.predict(bgr, batch_size=1)
        polys, scores = res["dt_polys"], res["dt_scores"]
        return [np.asarray(p, np.float32).reshape(-1, 2) for p in polys], [float(s) for s in scores]


def keep_text_boxes(
    gray: np.ndarray, polys: list[np.ndarray], scores: list[float]
) -> list[np.ndarray]:
    """The detections that look like text (see the module docstring)."""
    if not polys:
        return []
    edges = cv2.Canny(gray, *CANNY_THRESHOLDS)
    max_height = MAX_LINE_HEIGHT * min(gray.shape)
    kept = []
    for poly, score in zip(polys, scores, strict=True):
        if score < BOX_THRESH:
            continue
        if min(cv2.minAreaRect(poly.astype(np.float32))[1]) > max_height:
            continue
        mask = np.zeros(gray.shape, np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        inside = mask.astype(bool)
        if not inside.any() or edges[inside].mean() / 255.0 < MIN_EDGE_DENSITY:
            continue
        kept.append(poly)
    return kept


def union_mask(shape: tuple[int, ...], polys: list[np.ndarray]) -> np.ndarray:
    """Boolean (H, W) mask of the union of the polygons."""
    mask = np.zeros(shape[:2], np.uint8)
    if polys:
        cv2.fillPoly(mask, [np.round(p).astype(np.int32) for p in polys], 1)
    return mask.astype(bool)


class OcrStage(Stage):
    """Text area (union of detected text boxes / frame area) and text box count."""

    name = "ocr"
    reads_frames = True
    resources = Resources(cpus=0.5, memory_mb=WORKER_BASE_MB)  # its det model is 5 MB
    batch_size = 8
    uses_model = True

    def __init__(self, cfg: OcrConfig):
        self.engine = cfg.engine
        self.model_dir = cfg.model_dir
        self._detector: Any = None
        if self.engine == "paddleocr":
            mb = memory_estimate_mb(self.model_dir)
            self.resources = Resources(cpus=0.5, memory_mb=mb)  # type: ignore[misc]
        elif onnx_cuda_available():
            # a GPU when the cluster has one (onnxruntime-gpu installed); CPU otherwise
            self.resources = Resources(cpus=0.5, gpus=0.25, memory_mb=WORKER_BASE_MB)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_detector"] = None  # engines are rebuilt by setup() in each actor
        return state

    def required_files(self) -> list[LocalWeights]:
        if self.engine == "paddleocr":
            root = Path(self.model_dir) if self.model_dir is not None else Path("<ocr.model_dir>")
            return [
                LocalWeights(
                    root / "inference.yml", "PaddleOCR det model config", PADDLE_MODEL_HINT
                ),
                LocalWeights(
                    root / "inference.pdiparams", "PaddleOCR det weights", PADDLE_MODEL_HINT
                ),
            ]
        path = rapidocr_det_model()
        if path is None:
            return []
        return [LocalWeights(path, "RapidOCR text-detection model", RAPID_HOW)]

    def setup(self) -> None:
        if self._detector is None:
            if self.engine == "paddleocr":
                self._detector = _PaddleDetector(self.model_dir, self.device)
            else:
                self._detector = _RapidDetector(cuda=self.device == "cuda")

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Text polygons ((N, 2) float32, frame pixels) of one RGB frame, after filtering."""
        self.setup()
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        polys, scores = self._detector(bgr)
        return keep_text_boxes(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), polys, scores)

    def process_row(self, row: Row) -> Row:
        data = list(row.get("frames") or [])
        if row.get("kind") in ("image_edit", "video_edit"):  # text on either side counts
            data += list(row.get("target_frames") or [])
        if not data:
            raise SampleError("no_frames", "ocr needs the sampled frames (frames column)")
        area, boxes = 0.0, 0
        for rgb in as_frames(data):
            polys = self.detect(rgb)
            area = max(area, float(union_mask(rgb.shape, polys).mean()))
            boxes = max(boxes, len(polys))
        out = dict(row)
        out.update(ocr_area=area, ocr_boxes=boxes)
        return out
