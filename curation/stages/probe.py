"""Probe: what each input really is (from its bytes, never its extension), and its geometry.

For every input the probe detects the kind from content (``curation.probing.probe_file``),
checks the kind the user forced or the manifest gave, and fills the probe columns of the sample
contract. Sizes are *display* sizes (pixel aspect ratio and rotation metadata applied).

A file passes only when a first frame actually decodes, so header-only and truncated files
become ``decode_error`` rows here instead of failing later. Edit pairs are probed on both sides
(``target_*`` columns) and must be image/image or video/video.

Columns set: ``kind`` (detected), ``container``, ``codec``, ``width``/``height`` (display),
``rotation``, ``sample_aspect_ratio``, ``has_audio``, ``fps`` (average), ``num_frames``,
``duration``; ``target_width``/``target_height``/``target_num_frames`` for edit pairs. Rows
that fail before their kind is known get the kind their file name claims.

Video timing is measured, not taken from what the container claims: ``num_frames``,
``duration`` and ``fps`` agree with each other and with the stream's packets, and an fps outside
[``MIN_FPS``, ``MAX_FPS``] is an error (``curation.video_timing``).

Reason tags: ``empty_file``, ``not_found``, ``not_media``, ``decode_error``,
``no_video_stream``, ``unsupported_codec``, ``absurd_size``, ``too_long``, ``implausible_fps``,
``unverifiable_duration``, ``kind_mismatch``, ``missing_target``.
"""

from __future__ import annotations

from typing import ClassVar

from catalog.schema import EDIT_KINDS
from curation.config import ProbeConfig
from curation.probing import probe_file
from curation.stages.base import Resources, Row, SampleError, Stage, claimed_kind


class ProbeStage(Stage):
    """Detect the kind from content and fill the probe columns (and ``target_*`` for edits)."""

    name: ClassVar[str] = "probe"
    resources: ClassVar[Resources] = Resources(cpus=1)
    batch_size: ClassVar[int] = 8
    uses_model: ClassVar[bool] = False

    def __init__(self, cfg: ProbeConfig, kind: str = "auto"):
        self.limits = cfg
        # a conversation corpus names each record's kind (image or video) on its row
        self.default_kind = None if kind in ("auto", "conversation") else kind

    def process_batch(self, rows: list[Row]) -> list[Row]:
        out = super().process_batch(rows)
        # The contract needs a kind on every row: an input that failed before its kind was known
        # keeps the kind its file name claims.
        return [r if r.get("kind") else {**r, "kind": claimed_kind(r)} for r in out]

    def process_row(self, row: Row) -> Row:
        forced = row.get("kind") or self.default_kind
        target = row.get("target_uri")
        if forced in EDIT_KINDS and not target:
            raise SampleError("missing_target", f"kind {forced} needs a target_uri")
        src = probe_file(row["source_uri"], self.limits, "source: " if target else "")
        out = dict(row)
        out.update({k: v for k, v in src.items() if k != "kind"})
        if target:
            tgt = probe_file(target, self.limits, "target: ")
            if src["kind"] != tgt["kind"]:
                pair = forced if forced in EDIT_KINDS else "edit"
                raise SampleError(
                    "kind_mismatch",
                    f"{pair} pair: source is {src['kind']}, target is {tgt['kind']}",
                )
            kind = f"{src['kind']}_edit"
            out.update(
                target_width=tgt["width"],
                target_height=tgt["height"],
                target_num_frames=tgt["num_frames"],
            )
        else:
            kind = src["kind"]
        if forced is not None and forced != kind:
            raise SampleError("kind_mismatch", f"forced {forced}, content is {kind}")
        out["kind"] = kind
        return out
