"""Helpers shared by tests (importable: ``tests`` is on pytest's pythonpath)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from catalog.schema import make_key, rows_to_table
from catalog.shards import ShardWriter, bucket_name, sample_json

# A valid tiny recipe (omni_video tiny, one stage, t2i + t2v on one data entry)
TINY_RECIPE = {
    "name": "tiny",
    "model": {"family": "omni_video", "size": "tiny"},
    "data": {"main": {"uri": "catalog://demo@latest", "filter": "aesthetic > 4"}},
    "stages": [
        {
            "name": "align",
            "trainable": ["adapter", "vision_head"],
            "optimizer": {"lr": 1e-4, "weight_decay": 0.01},
            "frame_area": 1024,
            "token_budget": 4096,
            "tasks": {
                "t2i": {"weight": 1.0, "data": "main"},
                "t2v": {"weight": 2.0, "data": "main", "num_frames": 9, "fps": 8},
            },
            "steps": 10,
            "checkpoint_every": 5,
        }
    ],
}


def sample_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` contract rows with a known mix: every 5th errored, every 4th rejected, rest accepted."""
    rows = []
    for i in range(n):
        kind = "video" if i % 2 else "image"
        uri = f"/data/raw/{seed}/{i:04d}.{'mp4' if kind == 'video' else 'jpg'}"
        span = (0.0, 4.0) if kind == "video" else None
        width, height = (640, 360) if i % 3 else (512, 512)
        row = {
            "key": make_key(uri, span),
            "kind": kind,
            "source_uri": uri,
            "span": {"start": span[0], "end": span[1]} if span else None,
            "width": width,
            "height": height,
            "fps": 24.0 if kind == "video" else None,
            "num_frames": 96 if kind == "video" else 1,
            "duration": 4.0 if kind == "video" else 0.0,
            "aesthetic": 3.0 + (i % 7),
            "motion": 0.001 * (i % 5) if kind == "video" else None,
            "ocr_area": 0.01 * (i % 3),
            "status": "accepted",
            "reasons": [],
        }
        if i % 5 == 0:
            row.update(status="error", reasons=["decode_error"], width=None, height=None)
        elif i % 4 == 0:
            row.update(status="rejected", reasons=["low_aesthetic"])
        rows.append(row)
    return rows


def write_version_files(root: Path, rows: list[dict], max_samples: int = 4) -> list:
    """Write accepted rows into bucketed shards and all rows into ROOT/index; returns shards."""
    from catalog.index import write_index_part

    with ShardWriter(str(root), prefix="p0", max_samples=max_samples) as writer:
        for row in rows:
            if row["status"] != "accepted":
                continue
            row["bucket"] = bucket_name(row["width"], row["height"], row["num_frames"])
            ext = "mp4" if row["kind"] == "video" else "jpg"
            row["shard"] = writer.write(
                row["bucket"], row["key"], {"json": sample_json(row), ext: row["key"].encode()}
            )
    write_index_part(rows_to_table(rows), root / "index", "part-0")
    return writer.finished


# -- servers and the CLI (orchestration tests) ------------------------------------------------

OMNIFORGE = str(Path(sys.executable).with_name("omniforge"))
DATA = Path(__file__).resolve().parent / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outside_address() -> str | None:
    """This machine's non-loopback address (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def small_corpus(root: Path) -> Path:
    """Four real photos (tests/data) and two synthetic clips that pass the default filters."""
    from curation.sample_data.videos import VIDEOS, write_video

    root.mkdir(parents=True)
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "camera.png"):
        shutil.copy(DATA / name, root / name)
    for spec in VIDEOS[:2]:  # static_320x180, pan_slow_480x270
        write_video(root, f"{spec.name}.mp4", spec, seed=0)
    return root


def sample_digests(shard_uris) -> dict[str, dict[str, str]]:
    """Sample key -> sha256 of each tar member of every sample in ``shard_uris`` (a key written
    twice fails), the run id taken out of ``KEY.json`` (each run has its own)."""
    import hashlib
    import json

    from catalog.shards import iter_shard

    samples: dict[str, dict[str, str]] = {}
    for uri in shard_uris:
        for key, members in iter_shard(str(uri)):
            assert key not in samples, f"{key} written twice"
            meta = json.loads(members.pop("json"))
            meta.pop("run_id")
            samples[key] = {ext: hashlib.sha256(data).hexdigest() for ext, data in members.items()}
            samples[key]["json"] = json.dumps(meta, sort_keys=True)
    return samples


def stage_trace(out: Path | str, stage: str, rank: int) -> list[dict]:
    """The per-step trace a training stage wrote for ``rank`` (``trace=True``); ``out`` a
    local folder or an object-store URI."""
    import json

    import fsspec

    fs, root = fsspec.core.url_to_fs(str(out))
    folder = next(iter(fs.glob(f"{root}/stages/*-{stage}")))
    lines = fs.cat_file(f"{folder}/trace-rank{rank}.jsonl").decode().splitlines()
    return [json.loads(line) for line in lines]


def cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "COLUMNS": "250"}  # tables unwrapped
    return subprocess.run(
        [OMNIFORGE, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# -- media and inputs (curation tests) ----------------------------------------------------------


def input_row(source: Path | str, kind: str | None = None, target: Path | str | None = None):
    """A row as the listing gives it for ``source`` (and an edit pair's ``target``)."""
    source = str(source)
    target = str(target) if target is not None else None
    return {
        "key": make_key(source, target_uri=target),
        "source_uri": source,
        "target_uri": target,
        "kind": kind,
        "caption": None,
        "instruction": None,
        "status": None,
        "reasons": [],
    }


def find(labels: list[dict], **conds) -> dict:
    """The first corpus label whose fields equal ``conds`` (names change; properties do not)."""
    for lab in labels:
        if all(lab.get(k) == v for k, v in conds.items()):
            return lab
    raise LookupError(conds)


def frames_row(kind: str, frames: list, **extra) -> dict:
    """An accepted row carrying already sampled ``frames`` (half a second apart), as a scorer
    receives it from the frames stage; ``extra`` adds or replaces fields."""
    return {
        "key": f"k{id(frames)}",
        "kind": kind,
        "status": "accepted",
        "reasons": [],
        "frames": list(frames),
        "frame_times": [0.5 * i for i in range(len(frames))],
        **extra,
    }


def reference_frames(path: Path | str) -> list[np.ndarray]:
    """Every frame (RGB) decoded sequentially from the start by PyAV: the ground truth."""
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two same-shape uint8 images."""
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def write_rotated_video(path: Path, upright: np.ndarray, rotation: int) -> Path:
    """Six frames of ``upright`` (H, W, 3) stored turned by ``rotation`` degrees, with that
    rotation in the metadata: a player shows ``upright`` again. 24 fps."""
    from curation.sample_data.videos import encode_video

    stored = np.ascontiguousarray(np.rot90(upright, -rotation // 90))
    encode_video(
        path, (stored for _ in range(6)), stored.shape[1], stored.shape[0], 24, rotation=rotation
    )
    return path


def write_sar_video(path: Path) -> Path:
    """Four black frames of 96x64 stored pixels with a 4:3 sample aspect ratio: 128x64 shown."""
    import av

    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(4, 3)
        for _ in range(4):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((64, 96, 3), np.uint8))))
        out.mux(stream.encode(None))
    return path


# -- models ------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` for the block: tiny models are many small ops,
    where one thread is fastest and steadiest on a busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_image_shards(root: Path, prefix: str, n: int) -> Path:
    """``n`` 96x96 images (one bucket) captioned ``picture I``, three to a shard."""
    import io

    from PIL import Image

    writer = ShardWriter(str(root), prefix=prefix, max_samples=3)
    for i in range(n):
        png = io.BytesIO()
        Image.new("RGB", (96, 96), (30 * i, 200 - 20 * i, 90)).save(png, format="PNG")
        row = {"key": f"img{i}", "kind": "image", "status": "accepted", "width": 96,
               "height": 96, "num_frames": 1, "fps": None}  # fmt: skip
        writer.write(bucket_name(96, 96, 1), f"img{i}",
                     {"json": sample_json(row), "txt": f"picture {i}".encode(),
                      "png": png.getvalue()})  # fmt: skip
    writer.close()
    return root


class Kept:
    """What a Trainer needs from Ray Train, in-process: every reported checkpoint is kept (a
    copy: the trainer removes its own directory once reported); resumes from ``resume``."""

    def __init__(self, folder: Path, resume: Path | None = None):
        self.folder, self.resume = folder, resume
        self.kept: list[Path] = []

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir:
            self.kept.append(self.folder / f"checkpoint_{len(self.kept)}")
            shutil.copytree(checkpoint_dir, self.kept[-1])

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield self.resume


def kill_tree(pid: int) -> None:
    """Stop a process (no further commit while its tree is being killed), then SIGKILL it and
    every descendant."""
    import contextlib
    import signal

    import psutil

    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGSTOP)
    for child in proc.children(recursive=True) + [proc]:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGKILL)
