"""Numbers for people: how long, how big. One spelling across the CLI, the progress lines and
the curation report (they used to carry copies of these)."""

from __future__ import annotations

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def clock(seconds: float) -> str:
    """A running time or an ETA at a glance, whole seconds: ``42`` -> ``"42s"``, ``125`` ->
    ``"2m05s"``, ``3725`` -> ``"1h02m05s"``. Negative times (clocks of two machines) are 0."""
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def human_bytes(n: float | None) -> str:
    """A size in binary units, one decimal above bytes: ``6700`` -> ``"6.5 KiB"``, ``1000``
    -> ``"1,000 B"``; None (size unknown, e.g. an empty version) reads ``"0 B"``. TiB is the
    largest unit (``"2,048.0 TiB"``)."""
    size = float(n or 0)
    for unit in BYTE_UNITS:
        if abs(size) < 1024 or unit == BYTE_UNITS[-1]:
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable: the last unit returns")
