"""Whether the shards a catalog registered are still what it recorded: present, of the
recorded size, with the recorded sha256 (a local path or any fsspec URI).

The commit of a version runs this over every registered shard and refuses the version if any
is missing or corrupt; ``Catalog.verify_shards`` runs it on demand (``omniforge catalog
verify``).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import fsspec

from catalog.records import ShardRecord
from catalog.shards import sha256_file


@dataclass(frozen=True)
class ShardProblem:
    """A registered shard that is not what the catalog recorded."""

    uri: str
    kind: Literal["missing", "size", "checksum", "unreadable"]
    detail: str  # e.g. "wrong size: 4096 bytes, recorded 5120"

    def __str__(self) -> str:
        return f"{self.uri}: {self.detail}"


def check_shard(shard: ShardRecord) -> ShardProblem | None:
    """Exists, has the recorded size, has the recorded sha256 (local path or fsspec URI)."""
    try:
        fs, path = fsspec.core.url_to_fs(shard.uri)
        size = fs.size(path)
        if size != shard.num_bytes:
            return ShardProblem(
                shard.uri, "size", f"wrong size: {size} bytes, recorded {shard.num_bytes}"
            )
        digest = sha256_file(shard.uri)
    except FileNotFoundError:
        return ShardProblem(shard.uri, "missing", "missing")
    except (OSError, ImportError, ValueError) as e:  # unreachable store, missing fsspec extra
        return ShardProblem(shard.uri, "unreadable", f"unreadable: {e}")
    if digest != shard.sha256:
        return ShardProblem(
            shard.uri,
            "checksum",
            f"checksum mismatch: sha256 {digest[:12]}..., recorded {shard.sha256[:12]}...",
        )
    return None


def check_shards(shards: Sequence[ShardRecord]) -> list[ShardProblem]:
    """``check_shard`` over many shards in threads (hashlib and file reads release the GIL;
    the default pool size also keeps an object store busy)."""
    if not shards:
        return []
    with ThreadPoolExecutor() as pool:
        return [p for p in pool.map(check_shard, shards) if p is not None]
