"""Plain records the catalog returns (no ORM object leaves a session)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from catalog.models import NODE_TYPES


@dataclass(frozen=True)
class VersionInfo:
    id: int
    dataset: str
    version: int
    status: str
    counts: dict[str, int]
    num_samples: int
    num_bytes: int
    num_shards: int
    config_hash: str | None
    code_version: str | None
    parent_id: int | None
    root_uri: str | None
    index_uri: str | None
    run_id: int | None
    created_at: datetime
    committed_at: datetime | None

    @property
    def ref(self) -> str:
        return f"catalog://{self.dataset}@{self.version}"


@dataclass(frozen=True)
class ShardRecord:
    uri: str
    bucket: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class RunInfo:
    id: int
    kind: str
    name: str
    status: str
    config_hash: str | None
    params: dict[str, Any]
    mlflow_run_id: str | None
    ray_job_id: str | None
    message: str
    started_at: datetime
    ended_at: datetime | None


@dataclass(frozen=True)
class Node:
    type: str  # version | run | checkpoint
    id: int

    def __post_init__(self) -> None:
        if self.type not in NODE_TYPES:
            raise ValueError(f"node type {self.type!r}; allowed: {', '.join(NODE_TYPES)}")


@dataclass
class Resolution:
    """What ``catalog://NAME@VERSION`` + filter selects: shards and sample keys."""

    version: VersionInfo
    filter: str | None
    shards: list[ShardRecord]
    keys: list[str]
    num_matched: int = 0
    buckets: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Edge:
    parent: Node
    child: Node
    relation: str
    parent_label: str
    child_label: str
