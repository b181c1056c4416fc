"""P2 shard read: the training loader (TaskLoader) vs a raw sequential read of the same tars.

Shards: WebDataset tars written with the project's ``ShardWriter`` in the curation layout
(``shards/BUCKET/*.tar``, ``KEY.json`` + medium + ``KEY.txt``): H.264 clips (640x360, 3 s,
24 fps) and JPEG photos (1024x768 and other aspects), made once under ``bench/work/p2/``.
Loader settings: a 360p stage (``frame_area`` 640x360), video task t2v with 17 frames at
12 fps, image task t2i, a token budget of 2 clips per batch, 2 decode threads (the default).
The files are read once before timing, so every figure is from the page cache (the case
measures the loader, not the disk).

- read path: every sample of one epoch through the loader's stream cursor (shard order,
  grouping, JSON member, member reads; no decoding) vs ``tarfile`` reading every member of the
  same tars in order.
- read path from S3: the same read path over the same shards put in a bucket of the local S3
  server (``omniforge s3 up``: moto, objects in its memory, 127.0.0.1) through s3fs, vs the
  read path from disk (no goal: the client's cost, not a network's).
- full loader, per task: ``next_batch`` for one epoch (decode, resize/crop, tensors) vs the
  same tars read sequentially with the same decode functions (``decode_video`` /
  ``decode_image``), one thread.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from bench.harness import Context, Row, log, ratio

FRAME_AREA = 640 * 360
VIDEO_FRAMES, VIDEO_FPS = 17, 12.0


def make_shards(work: Path, quick: bool) -> tuple[Path, list[tuple[str, str, int]]]:
    """(root, [(shard uri, bucket, samples)]), written once."""
    import json

    root = work / ("p2-quick" if quick else "p2")
    listing = root / "shards.json"
    if listing.exists():
        return root, [tuple(x) for x in json.loads(listing.read_text())]
    import shutil

    import cv2

    from catalog.schema import make_key
    from catalog.shards import ShardWriter, bucket_name, sample_json
    from curation.sample_data.render import landscape, rng_for
    from curation.sample_data.videos import VideoSpec, write_video

    shutil.rmtree(root, ignore_errors=True)
    src = root / "src"
    src.mkdir(parents=True)
    log(f"  writing P2 shards under {root} (once)")
    palettes = ("day", "ocean", "forest", "sunset", "desert", "night")
    num_distinct = 3 if quick else 6
    videos = []
    for i in range(num_distinct):
        spec = VideoSpec(f"clip{i}", 640, 360, 3.0, palettes[i % 6], camera=(2 + i, 0))
        write_video(src, f"clip{i}.mp4", spec, seed=7)
        videos.append(((src / f"clip{i}.mp4").read_bytes(), 640, 360, spec.num_frames))
    images = []
    for i, (w, h) in enumerate([(1024, 768), (1024, 576), (768, 768), (576, 1024)][:num_distinct]):
        rgb = landscape(rng_for(7, f"img{i}"), h, w, palettes[i % 6])
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
        )
        images.append((buf.tobytes(), w, h))
    num_videos, num_images = (12, 24) if quick else (96, 192)
    with ShardWriter(str(root / "shards"), prefix="p0", max_samples=16) as writer:
        for i in range(num_videos):
            data, w, h, n = videos[i % len(videos)]
            uri = f"bench://p2/video/{i}"
            row = {"key": make_key(uri, (0.0, 3.0)), "kind": "video", "source_uri": uri}
            row.update(width=w, height=h, fps=24.0, num_frames=n, caption=f"clip {i}")
            members = {"json": sample_json(row), "mp4": data, "txt": row["caption"].encode()}
            writer.write(bucket_name(w, h, n), row["key"], members)
        for i in range(num_images):
            data, w, h = images[i % len(images)]
            uri = f"bench://p2/image/{i}.jpg"
            row = {"key": make_key(uri), "kind": "image", "source_uri": uri, "width": w}
            row.update(height=h, num_frames=1, caption=f"photo {i}")
            members = {"json": sample_json(row), "jpg": data, "txt": row["caption"].encode()}
            writer.write(bucket_name(w, h, 1), row["key"], members)
    shards = sorted((s.uri, s.bucket, s.num_samples) for s in writer.finished)
    listing.write_text(json.dumps(shards))
    return root, shards


def _tokenizer():
    from training.models.registry import build_model

    model = build_model("omni_video", "tiny")
    return model.tokenize, model.geometry


def make_loader(task: str, shards, tokenize, geometry):
    from training.data.loaders import TaskLoader

    return TaskLoader(
        task,
        shards,
        tokenize=tokenize,
        geometry=geometry,
        frame_area=FRAME_AREA,
        token_budget=2 * 5 * 45 * 80,  # 2 clips of 17 frames (5 latent frames) at 360p
        num_frames=VIDEO_FRAMES,
        fps=VIDEO_FPS,
        counts="records",  # every sample of these shards fits its task
    )


def loader_read_epoch(loader) -> int:
    """Every sample of one epoch through the loader's cursor, without decoding (each bucket's
    ``Stream.next_sample``: the loader has no public read-only API)."""
    n = 0
    for shape in loader.shapes:
        stream = loader._stream(shape)
        for _ in range(loader.samples_per_epoch(shape)):
            stream.next_sample()
            n += 1
    return n


def loader_decode_epoch(loader) -> int:
    n = 0
    for shape in loader.shapes:
        left = loader.samples_per_epoch(shape)
        while left > 0:
            size = min(loader.batch_size(shape), left)
            n += loader.next_batch(shape, size).size
            left -= size
    return n


def raw_read(uris: list[str]) -> int:
    """Sequential tar read of every member (what any reader has to do at least)."""
    n = 0
    for uri in uris:
        with tarfile.open(uri, mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    f = tar.extractfile(info)
                    if f is not None:
                        f.read()
                        n += info.name.endswith(".json")
    return n


def _groups(uri: str):
    """Samples of a tar as {extension: bytes}, grouped by key (WebDataset's rule)."""
    key, sample = None, {}
    with tarfile.open(uri, mode="r:") as tar:
        for info in tar:
            f = tar.extractfile(info)
            if f is None:
                continue
            k, ext = info.name.split(".", 1)
            if key is not None and k != key:
                yield sample
                sample = {}
            key = k
            sample[ext] = f.read()
    if sample:
        yield sample


def raw_decode(uris: list[str], task: str, loader) -> int:
    """Sequential tar read + the loader's own decode functions, one thread, no streams."""
    import json

    from training.data.buckets import shape_for_shard_bucket
    from training.data.decode import decode_image, decode_video, to_tensor

    n = 0
    for uri in uris:
        bucket = Path(uri).parent.name
        shape = shape_for_shard_bucket(
            bucket, loader.num_frames, FRAME_AREA, loader.spatial_factor, loader.temporal_factor
        )
        for sample in _groups(uri):
            meta = json.loads(sample["json"])
            if task == "t2v":
                to_tensor(list(decode_video(sample["mp4"], shape, VIDEO_FPS, meta.get("fps"))))
            else:
                to_tensor([decode_image(sample["jpg"], shape)])
            sample["txt"].decode("utf-8")
            n += 1
    return n


def time_read_path(ctx: Context, video, image, tokenize, geometry, label: str):
    """The read path of one epoch of both tasks' loaders (fresh loaders for every run)."""
    loaders: list = []

    def fresh() -> None:
        for loader in loaders:
            loader.close()
        loaders[:] = [
            make_loader(t, g, tokenize, geometry) for t, g in (("t2v", video), ("t2i", image))
        ]

    timing = ctx.time(
        lambda: sum(loader_read_epoch(loader) for loader in loaders), setup=fresh, label=label
    )
    for loader in loaders:
        loader.close()
    return timing


def read_from_s3(ctx: Context, root: Path, video, image, tokenize, geometry, t_disk):
    """The loader's read path over the same shards in a bucket of the local S3 server
    (``omniforge s3 up``: moto, in memory, on 127.0.0.1) vs from local disk (``t_disk``)."""
    import os

    import fsspec

    from orchestration import s3_cmd, services

    home = ctx.tmp("p2-s3-home")
    saved = {k: os.environ.get(k) for k in ("OMNIFORGE_HOME", *s3_cmd.client_env("x"))}
    os.environ["OMNIFORGE_HOME"] = str(home)
    port = _free_port()
    service = s3_cmd.start_server(port=port, buckets=("bench",))
    try:
        os.environ.update(s3_cmd.client_env(service.url))
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        remote = {}
        for uri, bucket, n in [*video, *image]:
            key = f"bench/{Path(uri).relative_to(root).as_posix()}"
            fs.put_file(uri, key)
            remote[uri] = (f"s3://{key}", bucket, n)
        in_s3 = [[remote[u] for u, _, _ in group] for group in (video, image)]
        t_s3 = time_read_path(ctx, *in_s3, tokenize, geometry, "loader read path from S3")
    finally:
        services.stop(s3_cmd.NAME)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    n = t_s3.extra[-1]
    mb = sum(Path(u).stat().st_size for u in remote) / 1e6  # the same bytes as on disk
    row = Row(
        "P2",
        "read path from S3 (local server): samples/s",
        n / t_s3.median,
        "samples/s",
        "the same loader read path from local disk",
        n / t_disk.median,
        ratio(t_disk.median, t_s3.median),
        None,
        note=f"MB/s S3 {mb / t_s3.median:.0f}, disk {mb / t_disk.median:.0f}; moto's server on "
        "127.0.0.1 (objects in its memory; no network latency or bandwidth limit), s3fs client",
    )
    return row, {"s3": t_s3.to_dict()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ctx: Context) -> list[Row]:
    root, shards = make_shards(ctx.work, ctx.quick)
    tokenize, geometry = _tokenizer()
    sizes = {uri: Path(uri).stat().st_size for uri, _, _ in shards}
    video = [s for s in shards if not s[1].endswith("_f1")]
    image = [s for s in shards if s[1].endswith("_f1")]
    all_uris = [u for u, _, _ in shards]
    raw_read(all_uris)  # into the page cache
    ctx.details["shards"] = {"count": len(shards), "mb": round(sum(sizes.values()) / 1e6, 1)}
    rows: list[Row] = []

    # read path: both tasks' streams vs raw tar read of all shards
    t_ours = time_read_path(ctx, video, image, tokenize, geometry, "loader read path")
    t_raw = ctx.time(lambda: raw_read(all_uris), label="raw tar read")
    n = t_ours.extra[-1]
    mb = sum(sizes.values()) / 1e6
    rows.append(
        Row(
            "P2",
            "read path (no decode): samples/s",
            n / t_ours.median,
            "samples/s",
            "raw sequential tar read (tarfile)",
            n / t_raw.median,
            ratio(t_raw.median, t_ours.median),
            ">= 0.9",
            note=f"MB/s ours {mb / t_ours.median:.0f}, raw {mb / t_raw.median:.0f}; "
            f"{n} samples, {mb:.0f} MB in {len(shards)} shards",
        )
    )
    figures: dict[str, Any] = {"read": {"ours": t_ours.to_dict(), "raw": t_raw.to_dict()}}
    s3_row, figures["read_s3"] = read_from_s3(ctx, root, video, image, tokenize, geometry, t_ours)
    rows.append(s3_row)
    for task, group in (("t2v", video), ("t2i", image)):
        uris = [u for u, _, _ in group]
        task_mb = sum(sizes[u] for u in uris) / 1e6
        holder: dict[str, Any] = {}

        def fresh(task=task, group=group, holder=holder) -> None:
            if holder.get("loader") is not None:
                holder["loader"].close()
            holder["loader"] = make_loader(task, group, tokenize, geometry)

        t_load = ctx.time(
            lambda holder=holder: loader_decode_epoch(holder["loader"]),
            setup=fresh,
            label=f"loader {task}",
        )
        probe = holder["loader"]
        t_base = ctx.time(
            lambda uris=uris, task=task, probe=probe: raw_decode(uris, task, probe),
            label=f"tar + decode {task}",
        )
        probe.close()
        n = t_load.extra[-1]
        rows.append(
            Row(
                "P2",
                f"full loader {task}: samples/s",
                n / t_load.median,
                "samples/s",
                "tar read + same decode, 1 thread",
                t_base.extra[-1] / t_base.median,
                ratio(t_base.median * n / max(1, t_base.extra[-1]), t_load.median),
                ">= 0.9",
                note=f"MB/s ours {task_mb / t_load.median:.1f}, baseline "
                f"{task_mb / t_base.median:.1f}; loader uses 2 decode threads",
            )
        )
        figures[task] = {"ours": t_load.to_dict(), "baseline": t_base.to_dict()}
    ctx.details["figures"] = figures
    return rows
