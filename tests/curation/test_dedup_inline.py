"""``curate run`` with ``dedup.inline``: repeats within the run are rejected as the blocks go,
and a resumed run remembers the samples its committed blocks accepted (the registry is seeded
from them; ``curation/stages/dedup_inline.py``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
from helpers import kill_tree

from catalog.index import read_index
from catalog.schema import make_key
from curation.dedup import HashRegistry
from curation.journal import Journal

DATA = Path(__file__).resolve().parents[1] / "data"
OMNIFORGE = str(Path(sys.executable).with_name("omniforge"))
BASE = 0x0123_4567_89AB_CDEF


def flip(value: int, bits: list[int]) -> int:
    for b in bits:
        value ^= 1 << b
    return value


def test_the_registry_keeps_the_first_and_names_the_closest():
    registry = HashRegistry(max_bits=3)
    far = flip(BASE, list(range(0, 64, 4)))
    assert registry.claim([("a", "image", [BASE]), ("b", "image", [far])]) == {}
    marks = registry.claim(
        [
            ("c", "image", [flip(BASE, [1, 2])]),  # 2 bits from a
            ("d", "image", [flip(far, [9])]),  # 1 bit from b
            ("e", "image", [flip(BASE, [1, 2, 3, 4])]),  # 4 bits: not near-exact
            ("v", "video", [BASE, BASE]),  # another kind
            ("a", "image", [BASE]),  # a block run again: its own sample
        ]
    )
    assert marks == {"c": ("a", "phash", 2.0), "d": ("b", "phash", 1.0)}
    assert len(registry) == 4  # a, b, e, v claimed; the repeats are not
    assert registry.claim([("f", "image", [flip(BASE, [1, 2, 3, 4, 5])])])["f"].kept == "e"


def named(root: Path, stem: str, suffix: str, fits) -> Path:
    """A file name in ``root`` whose key (inputs run in key order) ``fits``. Keys hash the
    whole path, so a name is searched for under each test's own folder."""
    for i in range(10_000):
        path = root / f"{stem}_{i}{suffix}"
        if fits(make_key(str(path))):
            return path
    raise AssertionError("no such name")


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, Path, Path]:
    """Ten distinct images, coffee.png running first and a re-encoded smaller copy of it last
    (inputs run in key order)."""
    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):  # distinct pictures: smoothed noise, a pHash far from every other
        noise = cv2.GaussianBlur(rng.integers(0, 256, (160, 200, 3), np.uint8), (9, 9), 0)
        # keys inside 1... to e...: a name before or after all of them is 1 in 16 to find
        middle = named(root, f"m_{i:02d}", ".png", lambda k: "1" <= k[0] <= "e")
        cv2.imwrite(str(middle), noise)
    keys = [make_key(str(p)) for p in root.iterdir()]
    original = named(root, "coffee", ".png", lambda k: k < min(keys))
    shutil.copy(DATA / "coffee.png", original)
    image = cv2.imread(str(DATA / "coffee.png"))
    small = cv2.resize(image, (image.shape[1] * 3 // 4, image.shape[0] * 3 // 4))
    copy = named(root, "copy", ".jpg", lambda k: k > max(keys))
    cv2.imwrite(str(copy), small, [cv2.IMWRITE_JPEG_QUALITY, 60])
    return root, original, copy


def test_a_resumed_inline_run_rejects_a_repeat_of_a_sample_committed_before(corpus, tmp_path):
    """The driver is killed once one of the two copies is committed (the recorded event) and
    before the other is; the rerun processes the other and rejects it as a repeat of the one
    the registry was seeded with. The copies run first and last of 12 inputs; should both be
    committed before the kill lands anyway, or the one committed be the repeat (on two workers
    the last input's block can claim its hash before the first's: first come, first kept), the
    attempt is made again (5 at most)."""
    root, first, last = corpus
    settings = ["name=inline", "block_size=1", "dedup.inline=true", "ocr.enabled=false"]
    settings += ["select.min_short_side=64", "aesthetic.enabled=false", "watermark.enabled=false"]
    pair = {make_key(str(first)), make_key(str(last))}
    for attempt in range(5):
        out, work = tmp_path / f"out{attempt}", tmp_path / f"work{attempt}"
        cmd = [OMNIFORGE, "curate", "run", "--input", str(root), "--output", str(out)]
        cmd += ["--catalog", f"sqlite:///{work / 'catalog.db'}"]
        for s in settings:
            cmd += ["--set", s]
        env = {**os.environ, "OMNIFORGE_HOME": str(work / "home")}
        work.mkdir()

        def committed(out: Path = out) -> set[str]:
            return Journal.committed_inputs(Journal(str(out)).records())

        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while driver.poll() is None and not pair & committed():  # the recorded event
            psutil.wait_procs([psutil.Process(driver.pid)], timeout=0.05)
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        kill_tree(driver.pid)
        driver.wait()
        done = committed()
        if len(pair & done) == 1:  # its block (block_size=1: it alone) accepted it
            (block,) = [r for r in Journal(str(out)).records() if pair & set(r.inputs)]
            if block.written.counts.get("accepted"):
                break
    else:
        raise AssertionError("no kill between the copies' commits, the first accepted, in 5 tries")
    (kept,) = pair & done
    (repeat,) = pair - done
    assert 1 <= len(done) < 12

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["run"]["inputs_skipped"] == len(done)
    rows = {r["key"]: r for r in read_index(str(out / "index")).to_pylist()}
    assert rows[kept]["status"] == "accepted"
    assert rows[repeat]["status"] == "rejected"
    assert rows[repeat]["reasons"] == [f"duplicate_of: {kept}"]
    assert rows[repeat]["duplicate_signal"].startswith("phash ")
    others = [r for k, r in rows.items() if k not in pair]
    assert len(others) == 10 and all(r["status"] == "accepted" for r in others)
