"""pairs: measurements for edit pairs (image_edit / video_edit); ``select`` thresholds them.

- ``edit_aspect_diff``: |aspect(source) - aspect(target)| / aspect(source), from probed sizes.
- ``edit_change``: mean absolute pixel change (0-1) between source and target frames, the
  target resized to the source frame; ~0 means the "edit" did nothing.
Whether both sides are the same kind is checked by probe (``kind_mismatch`` error); whether an
instruction is present is checked by select (``no_instruction``).
"""

from __future__ import annotations

import cv2
import numpy as np

from curation.media import as_frames
from curation.stages.base import Row, Stage


class EditPairStage(Stage):
    name = "pairs"
    reads_frames = True
    batch_size = 16

    def process_row(self, row: Row) -> Row:
        if row.get("kind") not in ("image_edit", "video_edit"):
            return row
        row = dict(row)
        sw, sh = row.get("width"), row.get("height")
        tw, th = row.get("target_width"), row.get("target_height")
        if sw and sh and tw and th:
            a_src, a_tgt = sw / sh, tw / th
            row["edit_aspect_diff"] = abs(a_src - a_tgt) / a_src
        src, tgt = row.get("frames") or [], row.get("target_frames") or []
        if src and tgt:
            changes = []
            for a, b in zip(as_frames(src), as_frames(tgt), strict=False):
                if b.shape != a.shape:
                    b = cv2.resize(b, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
                diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
                changes.append(float(diff.mean()) / 255.0)
            row["edit_change"] = float(np.mean(changes))
        return row
