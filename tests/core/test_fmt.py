"""How long and how big, as the CLI, the progress lines and the curation report print them."""

from __future__ import annotations

import pytest

from core.fmt import clock, human_bytes


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (42.9, "42s"), (60, "1m00s"), (125, "2m05s"), (3600, "1h00m00s"),
     (3725, "1h02m05s"), (30 * 3600 + 1, "30h00m01s"), (-5, "0s")],
)  # fmt: skip
def test_clock(seconds, text):
    assert clock(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, "0 B"), (0, "0 B"), (1, "1 B"), (1000, "1,000 B"), (1023, "1,023 B"),
     (1024, "1.0 KiB"), (6700, "6.5 KiB"), (5 * 2**20, "5.0 MiB"), (3 * 2**30, "3.0 GiB"),
     (2**40, "1.0 TiB"), (2048 * 2**40, "2,048.0 TiB")],
)  # fmt: skip
def test_human_bytes(n, text):
    assert human_bytes(n) == text
