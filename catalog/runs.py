"""Runs, checkpoints and lineage edges: the part of the catalog that records executions.

Mixed into ``Catalog``; relies on its ``session()``.
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from catalog.db import NotFound
from catalog.models import (
    RUN_KINDS,
    RUN_STATUSES,
    Checkpoint,
    DatasetVersion,
    LineageEdge,
    Run,
    utcnow,
)
from catalog.records import Edge, Node, RunInfo
from core.secrets import masked

ENV_JOB_ID = "OMNIFORGE_JOB_ID"  # set by ``omniforge submit`` in the job's runtime_env


def current_job_id() -> str | None:
    """The Ray Jobs submission id this process runs under, if any: ``OMNIFORGE_JOB_ID``, else
    the ``job_submission_id`` Ray puts in the driver's job config."""
    if os.environ.get(ENV_JOB_ID):
        return os.environ[ENV_JOB_ID]
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except json.JSONDecodeError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


class RunLedger:
    def session(self) -> AbstractContextManager[Session]:  # provided by Catalog
        raise NotImplementedError

    # -- runs ----------------------------------------------------------------------------------

    def start_run(
        self,
        kind: str,
        name: str = "",
        *,
        config_hash: str | None = None,
        params: dict[str, Any] | None = None,
        mlflow_run_id: str | None = None,
        ray_job_id: str | None = None,
        status: str = "running",
    ) -> int:
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind {kind!r}; allowed: {', '.join(RUN_KINDS)}")
        self._check_status(status)
        with self.session() as s:
            run = Run(
                kind=kind,
                name=name,
                status=status,
                config_hash=config_hash,
                params=masked(params or {}),
                mlflow_run_id=mlflow_run_id,
                ray_job_id=ray_job_id or current_job_id(),
            )
            s.add(run)
            s.flush()
            return run.id

    def update_run(self, run_id: int, **changes: Any) -> RunInfo:
        """Set any of status, mlflow_run_id, ray_job_id, message, params (merged)."""
        allowed = {"status", "mlflow_run_id", "ray_job_id", "message", "params"}
        bad = set(changes) - allowed
        if bad:
            raise ValueError(f"cannot update run fields {sorted(bad)}; allowed: {sorted(allowed)}")
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise NotFound(f"no run with id {run_id}")
            for key, value in changes.items():
                if key == "status":
                    self._check_status(value)
                    if value in ("succeeded", "failed", "cancelled"):
                        run.ended_at = utcnow()
                if key == "params":
                    value = {**(run.params or {}), **masked(value)}
                setattr(run, key, value)
            s.flush()
            return self._run_info(run)

    def get_run(self, run_id: int) -> RunInfo:
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise NotFound(f"no run with id {run_id}")
            return self._run_info(run)

    def list_runs(
        self, kind: str | None = None, limit: int = 50, job_id: str | None = None
    ) -> list[RunInfo]:
        """Newest first; optionally only one kind, or only the runs of one Ray job."""
        with self.session() as s:
            q = select(Run).order_by(Run.id.desc()).limit(limit)
            if kind:
                q = q.where(Run.kind == kind)
            if job_id:
                q = q.where(Run.ray_job_id == job_id)
            return [self._run_info(r) for r in s.scalars(q)]

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r}; allowed: {', '.join(RUN_STATUSES)}")

    @staticmethod
    def _run_info(r: Run) -> RunInfo:
        return RunInfo(
            r.id,
            r.kind,
            r.name,
            r.status,
            r.config_hash,
            dict(r.params or {}),
            r.mlflow_run_id,
            r.ray_job_id,
            r.message,
            r.started_at,
            r.ended_at,
        )

    # -- checkpoints and lineage ---------------------------------------------------------------

    def add_checkpoint(self, run_id: int, uri: str, step: int) -> int:
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"no run with id {run_id}")
            ck = Checkpoint(run_id=run_id, uri=uri, step=step)
            s.add(ck)
            s.flush()
            s.add(
                LineageEdge(
                    parent_type="run",
                    parent_id=run_id,
                    child_type="checkpoint",
                    child_id=ck.id,
                    relation="produced",
                )
            )
            return ck.id

    def add_edge(self, parent: Node, child: Node, relation: str = "") -> None:
        """Record ``parent -> child`` (idempotent)."""
        with self.session() as s:
            for node in (parent, child):
                if self._node_row(s, node) is None:
                    raise NotFound(f"lineage node {node.type} {node.id} does not exist")
            exists = s.scalar(
                select(LineageEdge.id).where(
                    LineageEdge.parent_type == parent.type,
                    LineageEdge.parent_id == parent.id,
                    LineageEdge.child_type == child.type,
                    LineageEdge.child_id == child.id,
                )
            )
            if exists is None:
                edge = LineageEdge(
                    parent_type=parent.type,
                    parent_id=parent.id,
                    child_type=child.type,
                    child_id=child.id,
                    relation=relation,
                )
                s.add(edge)

    def lineage(self, node: Node) -> tuple[list[Edge], list[Edge]]:
        """(upstream edges, downstream edges) reachable from ``node``, nearest first."""
        with self.session() as s:
            return self._walk(s, node, up=True), self._walk(s, node, up=False)

    def _walk(self, s: Session, start: Node, up: bool) -> list[Edge]:
        seen, frontier, edges = {start}, [start], []
        while frontier:
            nxt = []
            for node in frontier:
                if up:
                    q = select(LineageEdge).where(
                        LineageEdge.child_type == node.type, LineageEdge.child_id == node.id
                    )
                else:
                    q = select(LineageEdge).where(
                        LineageEdge.parent_type == node.type, LineageEdge.parent_id == node.id
                    )
                for e in s.scalars(q.order_by(LineageEdge.id)):
                    p, c = Node(e.parent_type, e.parent_id), Node(e.child_type, e.child_id)
                    edges.append(Edge(p, c, e.relation, self._label(s, p), self._label(s, c)))
                    other = p if up else c
                    if other not in seen:
                        seen.add(other)
                        nxt.append(other)
            frontier = nxt
        return edges

    @staticmethod
    def _node_row(s: Session, node: Node) -> Any:
        model = {"version": DatasetVersion, "run": Run, "checkpoint": Checkpoint}[node.type]
        return s.get(model, node.id)

    def _label(self, s: Session, node: Node) -> str:
        row = self._node_row(s, node)
        if row is None:
            return f"{node.type} {node.id} (missing)"
        if node.type == "version":
            return f"catalog://{row.dataset.name}@{row.version} [{row.status}]"
        if node.type == "run":
            return f"run {row.id} {row.kind} {row.name!r} [{row.status}]"
        return f"checkpoint {row.id} step {row.step} {row.uri}"
