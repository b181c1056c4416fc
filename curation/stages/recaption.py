"""Recaption: a vision-language model writes ``recaption`` from a sample's frames.

Off unless ``recaption.backend`` is not ``none``. What is written, per kind:

- ``video``: one or two sentences on the subject, its motion, the camera movement and the
  setting, from up to ``max_frames`` frames in time order;
- ``image``: subject, style and setting;
- ``image_edit`` / ``video_edit``: the edit ``instruction`` rewritten into a clear, specific
  one from the source (and, when the row carries ``target_frames``, target) frames. The
  rewrite goes to ``recaption``; the original ``instruction`` is kept as it was.

The supplied ``caption``, when present, is given to the model as a hint. Prompts are the
module constants ``PROMPTS`` (overridable per kind); the row's hint and instruction are
appended to them.

Backends (``openai``, ``transformers``) and the caption cache are ``curation.captioners``'s.

Failure rule: a sample whose caption cannot be obtained (request failed after retries,
non-retryable HTTP error, empty answer, malformed frames, no frames, edit with neither an
instruction nor target frames) becomes ``status="error"`` with reason
``recaption_failed: <why>``; ``recaption`` stays null. It is counted with the other errors and
a rerun asks again for it only (cached successes are not re-asked).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from curation.captioners import (
    DEFAULT_BACKOFF_S,
    CaptionCache,
    Job,
    OpenAIBackend,
    RecaptionFailed,
    TransformersBackend,
    cache_key,
    default_cache_dir,
)
from curation.config import RecaptionConfig
from curation.media import as_frames, fit_max_side
from curation.stages.base import LocalWeights, Resources, Row, SampleError, Stage, mark_error
from curation.weights import memory_estimate_mb

VIDEO_PROMPT = (
    "You write captions for a text-to-video training set. The images are frames of one video "
    "clip, in time order. In one or two sentences, describe the main subject, how it moves, "
    "the camera movement (static, pan, tilt, zoom, tracking or handheld) and the background or "
    "setting. Answer with the caption only."
)
IMAGE_PROMPT = (
    "You write captions for a text-to-image training set. In one or two sentences, describe "
    "the main subject, the visual style (photo, illustration, 3D render, painting, ...) and the "
    "setting. Answer with the caption only."
)
IMAGE_EDIT_PROMPT = (
    "You write instructions for an image-editing training set. You see the source image and, "
    "when given, the edited target image. Rewrite the edit instruction below into one clear, "
    "specific instruction that turns the source into the target: name the object, the change "
    "and where it happens, and leave out anything that does not change. Answer with the "
    "instruction only."
)
VIDEO_EDIT_PROMPT = (
    "You write instructions for a video-editing training set. You see frames of the source "
    "video and, when given, of the edited target video, in time order. Rewrite the edit "
    "instruction below into one clear, specific instruction that turns the source into the "
    "target: name the object, the change and where and when it happens, and leave out anything "
    "that does not change. Answer with the instruction only."
)
PROMPTS: dict[str, str] = {
    "video": VIDEO_PROMPT,
    "image": IMAGE_PROMPT,
    "image_edit": IMAGE_EDIT_PROMPT,
    "video_edit": VIDEO_EDIT_PROMPT,
}
HINT_TEMPLATE = "Existing caption (a hint; it may be incomplete or wrong): {caption}"
INSTRUCTION_TEMPLATE = "Edit instruction: {instruction}"
NO_INSTRUCTION = (
    "Edit instruction: (none was given; write one from the difference between source and target)"
)

DEFAULT_MAX_FRAMES = 4  # frames of a video (per side for video_edit) shown to the model
DEFAULT_IMAGE_MAX_SIDE = 512  # frames are downscaled to this before they are sent
DEFAULT_MAX_NEW_TOKENS = 96
MODEL_HINT = "Qwen/Qwen2-VL-2B-Instruct"


def _pick(frames: list[Any], n: int) -> list[Any]:
    """Up to n frames evenly spaced over the list (first and last included)."""
    if len(frames) <= n:
        return list(frames)
    idx = np.unique(np.linspace(0, len(frames) - 1, n).round().astype(int))
    return [frames[i] for i in idx]


def build_prompt(row: Row, template: str) -> str:
    kind = row.get("kind")
    lines = [template.strip()]
    if kind in ("image_edit", "video_edit"):
        instruction = (row.get("instruction") or "").strip()
        lines.append(
            INSTRUCTION_TEMPLATE.format(instruction=instruction) if instruction else NO_INSTRUCTION
        )
    caption = (row.get("caption") or "").strip()
    if caption:
        lines.append(HINT_TEMPLATE.format(caption=caption))
    return "\n\n".join(lines)


def _clean(text: str) -> str:
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


# --- the stage ----------------------------------------------------------------------------


class RecaptionStage(Stage):
    """Writes ``recaption`` (see the module docstring for prompts, backends, cache, failures).

    ``RecaptionStage(cfg.recaption)``.
    Keyword arguments override the section's ``cache_dir``, ``prompts`` (kind -> template),
    ``max_frames``, ``image_max_side``, ``max_new_tokens``, ``backoff_s``, ``gpus``;
    ``sleep`` is how the openai backend waits between attempts (``time.sleep``; tests record).
    """

    name = "recaption"
    reads_frames = True
    resources = Resources(cpus=0.5)
    batch_size = 16
    uses_model = True

    def __init__(
        self,
        cfg: RecaptionConfig,
        *,
        cache_dir: str | Path | None = None,
        prompts: dict[str, str] | None = None,
        max_frames: int | None = None,
        image_max_side: int | None = None,
        max_new_tokens: int | None = None,
        backoff_s: float | None = None,
        gpus: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if cfg.backend == "none":
            raise ValueError("recaption.backend is 'none': the recaption stage is off")
        if cfg.backend not in ("openai", "transformers"):
            raise ValueError(f"unknown recaption.backend {cfg.backend!r}")

        def opt(value: Any, key: str, default: Any) -> Any:
            if value is not None:
                return value
            got = getattr(cfg, key, None)
            return default if got is None else got

        self.cfg = cfg
        self.backend = cfg.backend
        self.cache_dir = str(opt(cache_dir, "cache_dir", None) or default_cache_dir())
        self.prompts = {**PROMPTS, **dict(opt(prompts, "prompts", {}))}
        unknown = set(self.prompts) - set(PROMPTS)
        if unknown:
            raise ValueError(f"recaption prompts for unknown kinds: {sorted(unknown)}")
        self.max_frames = int(opt(max_frames, "max_frames", DEFAULT_MAX_FRAMES))
        self.image_max_side = int(opt(image_max_side, "image_max_side", DEFAULT_IMAGE_MAX_SIDE))
        self.max_new_tokens = int(opt(max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self.backoff_s = float(opt(backoff_s, "backoff_s", DEFAULT_BACKOFF_S))
        self.sleep = sleep
        if self.backend == "openai":
            self.model_id = f"openai:{cfg.model}"
            self.concurrency = int(cfg.concurrency)
            # A batch must hold enough rows to keep `concurrency` requests in flight.
            self.batch_size = min(max(type(self).batch_size, self.concurrency), 64)
        else:
            self.model_id = f"transformers:{Path(cfg.model_dir).resolve()}"
            self.concurrency = 1
            self.batch_size = 4
            n_gpus = float(opt(gpus, "gpus", 0.0))
            mb = memory_estimate_mb(cfg.model_dir)
            self.resources = Resources(cpus=type(self).resources.cpus, gpus=n_gpus, memory_mb=mb)
        self.view = f"frames={self.max_frames},side={self.image_max_side}"
        self._engine: OpenAIBackend | TransformersBackend | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._cache: CaptionCache | None = None

    # Built per worker in setup(); never pickled.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_engine=None, _pool=None, _cache=None)
        return state

    def required_files(self) -> list[LocalWeights]:
        if self.backend != "transformers":
            return []
        model_dir = Path(self.cfg.model_dir)
        return [
            LocalWeights(
                model_dir / "config.json",
                "recaption VLM (a transformers model directory)",
                f"on a machine with network: `hf download {MODEL_HINT} --local-dir {model_dir}` "
                f"(or `huggingface-cli download {MODEL_HINT} --local-dir {model_dir}`), "
                "then copy the directory here",
            )
        ]

    def setup(self) -> None:
        self._cache = CaptionCache(self.cache_dir)
        if self.backend == "openai":
            env = self.cfg.api_key_env
            self._engine = OpenAIBackend(
                endpoint=self.cfg.endpoint,
                model=self.cfg.model,
                api_key=os.environ.get(env) if env else None,
                timeout_s=float(self.cfg.timeout_s),
                max_retries=int(self.cfg.max_retries),
                backoff_s=self.backoff_s,
                max_new_tokens=self.max_new_tokens,
                sleep=self.sleep,
            )
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="recaption")
        else:
            self._engine = TransformersBackend(Path(self.cfg.model_dir), self.max_new_tokens)

    def _ready(self) -> None:
        if self._engine is None:
            self.setup()

    def describe(self) -> str:
        where = self.cfg.endpoint if self.backend == "openai" else self.cfg.model_dir
        return f"{super().describe()}, {self.backend} {where}"

    # --- per sample ---

    def make_job(self, row: Row) -> Job:
        """Prompt, frames and cache digest of one row (frames are checked and scaled in _ask)."""
        kind = row.get("kind")
        if kind not in self.prompts:
            raise SampleError("recaption_failed", f"unknown kind {kind!r}")
        frames = list(row.get("frames") or [])
        if not frames:
            raise SampleError("recaption_failed", "the row has no frames")
        prompt = build_prompt(row, self.prompts[kind])
        parts: list[tuple[str, Any]] = [("text", prompt)]
        if kind == "image":
            parts.append(("image", frames[0]))
        elif kind == "video":
            picked = _pick(frames, self.max_frames)
            parts.append(("text", f"{len(picked)} frames of the clip, in time order:"))
            parts += [("image", f) for f in picked]
        else:
            target = list(row.get("target_frames") or [])
            if not target and not (row.get("instruction") or "").strip():
                raise SampleError(
                    "recaption_failed", "edit sample with neither an instruction nor target frames"
                )
            n = 1 if kind == "image_edit" else self.max_frames
            src = _pick(frames, n)
            parts.append(("text", "Source:" if n == 1 else f"Source ({len(src)} frames):"))
            parts += [("image", f) for f in src]
            if target:
                tgt = _pick(target, n)
                parts.append(("text", "Target:" if n == 1 else f"Target ({len(tgt)} frames):"))
                parts += [("image", f) for f in tgt]
        sample_key = (
            row.get("key") or hashlib.sha256(b"".join(f.tobytes() for f in frames)).hexdigest()
        )
        view = f"{self.view},target={int(bool(row.get('target_frames')))}"
        return Job(
            parts=parts,
            prompt=prompt,
            digest=cache_key(sample_key, prompt, self.model_id, view),
            sample_key=sample_key,
        )

    def _ask(self, job: Job) -> str:
        """Check + downscale the frames, ask the model, store the answer; RecaptionFailed."""
        assert self._engine is not None and self._cache is not None
        try:
            parts = [
                (k, fit_max_side(as_frames([v])[0], self.image_max_side) if k == "image" else v)
                for k, v in job.parts
            ]
        except ValueError as e:
            raise RecaptionFailed(f"bad frame: {e}") from None
        text = _clean(self._engine.caption(Job(parts, job.prompt, job.digest, job.sample_key)))
        if not text:
            raise RecaptionFailed("the model answered with an empty caption")
        self._cache.put(
            job.digest,
            {
                "key": job.sample_key,
                "model": self.model_id,
                "prompt": job.prompt,
                "view": self.view,
                "recaption": text,
                "created": time.time(),
            },
        )
        return text

    def _try(self, job: Job) -> str | Exception:
        try:
            return self._ask(job)
        except Exception as e:  # one sample's failure is data
            return e

    def process_row(self, row: Row) -> Row:
        return self.process_batch([row])[0]

    def process_batch(self, rows: list[Row]) -> list[Row]:
        self._ready()
        assert self._cache is not None
        out: list[Row] = list(rows)
        todo: list[tuple[int, Job]] = []
        for i, row in enumerate(rows):
            if row.get("status") == "error":
                continue
            try:
                job = self.make_job(row)
            except SampleError as e:
                out[i] = {**mark_error(row, e.reason, e.detail), "recaption": None}
                continue
            cached = self._cache.get(job.digest)
            if cached is not None:
                out[i] = {**row, "recaption": cached}
            else:
                todo.append((i, job))
        if self._pool is not None and len(todo) > 1:
            results = list(self._pool.map(self._try, [job for _, job in todo]))
        else:
            results = [self._try(job) for _, job in todo]
        for (i, _), result in zip(todo, results, strict=True):
            if isinstance(result, str):
                out[i] = {**rows[i], "recaption": result}
            else:
                why = str(result) if isinstance(result, RecaptionFailed) else _describe(result)
                out[i] = {**mark_error(rows[i], "recaption_failed", why), "recaption": None}
        return out


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
