"""resolution / aspect: size and shape checks on the probed display size (no decoding).

These need no computation beyond probe, so they run inside ``select`` (and re-run with
``curate select``); this file holds the rule. Defaults: ``min_short_side`` 256 px,
aspect ``1/3 .. 3`` (width / height), see ``stages/select.py`` for where they come from.
"""

from __future__ import annotations

from curation.config import SelectConfig


def resolution_reasons(width: int | None, height: int | None, sel: SelectConfig) -> list[str]:
    """``too_small`` / ``aspect_ratio`` reasons for a display size (empty when it passes)."""
    if not width or not height:
        return []
    out = []
    short, aspect = min(width, height), width / height
    if sel.min_short_side is not None and short < sel.min_short_side:
        out.append(f"too_small: {short} < {sel.min_short_side}")
    if sel.min_aspect is not None and aspect < sel.min_aspect:
        out.append(f"aspect_ratio: {aspect:.4g} < {sel.min_aspect:.4g}")
    if sel.max_aspect is not None and aspect > sel.max_aspect:
        out.append(f"aspect_ratio: {aspect:.4g} > {sel.max_aspect:.4g}")
    return out
