"""Perceptual hashes of each sample's sampled frames: the cheap signal of duplicate detection.

pHash as ``imagehash.phash`` computes it (the reference implementation): the frame in grey
scaled to 32x32, its 2-D DCT, and the 8x8 lowest frequencies compared with their median: 64
bits that stay nearly the same through re-encoding, resizing and small crops and change with
the content. Two frames are near-duplicates when few bits differ (``hamming``).

Columns: ``phash``, one unsigned 64-bit hash per sampled frame in sample order (``frames``:
a video clip's frames at the centres of N equal segments, so two copies of one clip hash the
same positions; one for an image), and ``target_phash`` for an edit pair's target
(``target_frames``). A row without frames (its frames were not sampled) gets None.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from curation.media import as_frames

from .base import Resources, Row, Stage

HASH_BITS = 64  # imagehash's default hash_size 8: an 8x8 bit matrix


def phash(rgb: np.ndarray) -> int:
    """The 64-bit pHash of one RGB frame, as an unsigned integer (row-major bits, first bit
    most significant: ``int(str(imagehash.phash(image)), 16)``)."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(rgb)).hash.ravel()
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    """Bits that differ between two hashes."""
    return (int(a) ^ int(b)).bit_count()


def frame_hashes(values: Any) -> list[int] | None:
    frames = as_frames(values)
    return [phash(f) for f in frames] if frames else None


class PerceptualHashStage(Stage):
    """``phash`` / ``target_phash`` of every sample with sampled frames."""

    name: ClassVar[str] = "phash"
    reads_frames: ClassVar[bool] = True
    resources: ClassVar[Resources] = Resources(cpus=1)
    batch_size: ClassVar[int] = 16  # ~0.1 ms a frame: batches only amortise the hand-over
    uses_model: ClassVar[bool] = False

    def process_row(self, row: Row) -> Row:
        out = dict(row)
        out["phash"] = frame_hashes(row.get("frames"))
        out["target_phash"] = frame_hashes(row.get("target_frames"))
        return out
