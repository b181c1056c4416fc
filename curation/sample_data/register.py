"""Register a generated sample corpus as a catalog dataset version, from its ground truth.

No probing or scoring happens here: the generator knows every property by construction, so its
labels become the index rows directly (valid media ``accepted``, corrupt files ``error`` with
``corrupt:<how>``, edit pairs labelled to fail a pair check ``rejected`` with
``pair:<check>``). Accepted samples are written to bucketed WebDataset shards in the same
format curation writes, so training can run on the corpus before any curation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from catalog.index import write_index_part
from catalog.schema import KINDS, make_key, rows_to_table
from catalog.shards import ShardWriter, bucket_name, sample_json
from catalog.store import Catalog, VersionInfo
from core.storage import location

from .labels import LABELS_FILE, load_labels

EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "mp4": "mp4", "mkv": "mkv"}


def caption_for(label: dict[str, Any]) -> str:
    """A plain description built from the truth (what a captioner should say)."""
    kind = label.get("true_kind") or label["kind"]
    words = [f"a synthetic {kind}"]
    if label.get("motion"):
        words.append(
            {
                "static": "with a still camera",
                "slow": "with a slow camera pan",
                "fast": "with a fast camera pan",
            }[label["motion"]]
        )
    if label.get("cuts_s"):
        words.append(f"with {len(label['cuts_s'])} scene cuts")
    if label.get("has_text") and label.get("text"):
        words.append("showing the text " + ", ".join(repr(t) for t in label["text"][:3]))
    if label.get("has_watermark"):
        words.append("with a watermark logo")
    return " ".join(words)


def label_to_row(root: Path, label: dict[str, Any]) -> dict[str, Any]:
    is_edit = label["kind"] in ("image_edit", "video_edit")
    source = str((root / (label["source"] if is_edit else label["path"])).resolve())
    target = str((root / label["target"]).resolve()) if is_edit else None
    width = label.get("display_width") or label.get("width")
    height = label.get("display_height") or label.get("height")
    if is_edit and label.get("source_size"):
        width, height = label["source_size"]
    is_video = (label.get("true_kind") or label["kind"].split("_")[0]) == "video"
    row: dict[str, Any] = {
        "key": make_key(source, target_uri=target),
        "kind": label["kind"] if label["kind"] in KINDS else label.get("claimed_kind") or "image",
        "source_uri": source,
        "container": label.get("container") or label.get("format"),
        "codec": label.get("codec"),
        "width": width,
        "height": height,
        "rotation": label.get("rotation") or 0,
        "fps": label.get("fps"),
        "num_frames": label.get("num_frames") or (None if is_video else 1),
        "duration": label.get("duration") if is_video else 0.0,
        "caption": caption_for(label),
        "instruction": label.get("instruction"),
        "status": "accepted",
        "reasons": [],
    }
    if is_edit:
        tw, th = label.get("target_size") or (None, None)
        row.update(
            target_uri=target,
            target_width=tw,
            target_height=th,
            target_num_frames=row["num_frames"],
        )
    if label.get("expect") == "error":
        row.update(status="error", reasons=[f"corrupt:{label.get('corrupt') or 'undecodable'}"])
        for k in ("width", "height", "fps", "num_frames", "duration", "codec", "container"):
            row[k] = None
    elif is_edit and not label.get("expect_pair_ok", True):
        row.update(status="rejected", reasons=[f"pair:{f}" for f in label["expect_pair_failures"]])
    return row


def register_sample_corpus(
    corpus: Path,
    catalog: Catalog,
    name: str = "sample-corpus",
    max_samples: int = 64,
    root: str | Path | None = None,
) -> VersionInfo:
    """Index every labelled item, shard the accepted ones, commit a version of ``name``.

    The version lives in ``root`` (shards + index; a folder or an ``s3://`` / ``gs://``
    prefix; default ``corpus/_dataset``, which a curation run of the corpus lists as hidden:
    pass a folder outside the corpus to keep it out). Registering the same corpus again
    reuses an interrupted pending version, or makes a new committed version.
    """
    corpus = Path(corpus).resolve()
    labels = load_labels(corpus)
    root = location(root if root is not None else corpus / "_dataset", "root").uri
    digest = hashlib.sha256((corpus / LABELS_FILE).read_bytes()).hexdigest()
    done = catalog.find_committed(name, root, digest)
    if done is not None:
        return done
    version = catalog.begin_version(
        name,
        root_uri=root,
        config_hash=digest,
        note="ground-truth registration of the generated sample corpus",
    )
    rows = [label_to_row(corpus, lab) for lab in labels]
    with ShardWriter(root, prefix=f"v{version.version}", max_samples=max_samples) as writer:
        for row, label in zip(rows, labels, strict=True):
            if row["status"] != "accepted":
                continue
            row["bucket"] = bucket_name(row["width"], row["height"], row["num_frames"] or 1)
            row["shard"] = writer.write(row["bucket"], row["key"], _members(corpus, row, label))
    write_index_part(rows_to_table(rows), f"{root}/index", f"v{version.version}")
    catalog.add_shards(version.id, writer.finished)
    return catalog.commit_version(version.id, f"{root}/index")


def _members(corpus: Path, row: dict[str, Any], label: dict[str, Any]) -> dict[str, bytes]:
    members = {"json": sample_json(row), "txt": (row["instruction"] or row["caption"]).encode()}
    if row.get("target_uri"):
        src, tgt = Path(row["source_uri"]), Path(row["target_uri"])
        members[f"src.{src.suffix.lstrip('.').lower()}"] = src.read_bytes()
        members[f"tgt.{tgt.suffix.lstrip('.').lower()}"] = tgt.read_bytes()
    else:
        ext = EXTENSIONS.get(label.get("format") or "", Path(row["source_uri"]).suffix.lstrip("."))
        members[ext] = Path(row["source_uri"]).read_bytes()
    return members
