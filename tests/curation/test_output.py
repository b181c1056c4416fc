"""The output folder: one run at a time, and write failures end in one line naming the path.

The disk-full and read-only cases mount a small tmpfs over the output folder in a private
user + mount namespace (``unshare -rm``): a real ENOSPC / EROFS from the kernel, seen by the
driver and by the Ray workers it starts, without touching the machine's own mounts.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from curation.output import OutputBusy, output_lock

OMNIFORGE = str(Path(sys.executable).with_name("omniforge"))
DATA = Path(__file__).resolve().parents[1] / "data"


def curate(inputs: Path, out: Path, tmp_path: Path) -> list[str]:
    return [
        OMNIFORGE,
        "curate",
        "run",
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--catalog",
        f"sqlite:///{tmp_path / 'catalog.db'}",
        "--set",
        "ocr.enabled=false",
        "--set",
        "select.max_ocr_area=null",
    ]


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "camera.png"):
        shutil.copy(DATA / name, root / name)
    return root


def test_a_second_run_into_the_same_output_is_refused(photos, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputBusy), output_lock(out):
            pass
        done = subprocess.run(
            curate(photos, out, tmp_path), capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"{out} is being written by another curation run (pid " in line
    assert not (out / "index").exists()
    with output_lock(out):  # released when its holder ends
        pass


def in_namespace(mount: str, command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``command`` with a tmpfs (``mount`` options) over ``tmp_path/out``."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    script = f"mount -t tmpfs -o {mount} none {shlex.quote(str(out))} && exec {shlex.join(command)}"
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600
    )


def test_a_full_disk_ends_the_run_in_one_line_naming_the_path_and_errno(photos, tmp_path):
    done = in_namespace("size=600k", curate(photos, tmp_path / "out", tmp_path), tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {tmp_path / 'out'}/"), done.stderr[-3000:]
    assert last.endswith("[ENOSPC] No space left on device")
    assert "Traceback" not in done.stderr


def test_a_read_only_output_ends_in_one_line(photos, tmp_path):
    done = in_namespace("ro", curate(photos, tmp_path / "out", tmp_path), tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert (
        line == f"error: cannot write {tmp_path / 'out' / '.lock'}: [EROFS] Read-only file system"
    )
