"""The streaming engine: blocks of inputs flow through the steps and are committed one by one.

The driver keeps at most ``max_in_flight`` blocks in the pipeline. A block goes to the least
busy worker of each step in turn (``curation.adapter``); the rows between steps stay in Ray's
object store (the driver only sees each step's small ``StepInfo``); the last step writes the
block, and the driver then commits it (``curation.journal``). There is no barrier anywhere:
a block is on disk and committed while others are still decoding, so a crash loses at most
the blocks in flight, and a rerun skips every committed input.

Why Ray actors and not Ray Data: our sink must commit per block and resume per input, which
Ray Data's write path (a barrier before the sink) does not give, and on small machines its
per-operator tasks and streaming executor cost more than the work (P1 in bench/ measured
0.3x a process pool). A few long-lived actors driven by one loop is the shape Cosmos-Curate's
and NeMo Curator's Xenna streaming executor uses too.

Faults. Ray restarts a killed actor and re-runs its call (``adapter.ACTOR_RETRIES``). When a
block still fails because a worker died (a system failure), the driver runs it again from the
first step (``max_attempts`` in all), then splits it in halves, down to single inputs; an
exception raised by stage code fails the same way every time, so such a block is split at
once. An input that fails alone becomes an error row (``worker_failed``) that goes straight to
the sink, so one poisonous file cannot stop the run. Write failures (``OutputError``: disk
full, read-only output) and failures of every block for a long stretch stop the run at once
with one message (``CurationAborted``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import pyarrow as pa
import pyarrow.compute as pc

from core.cluster import init_ray
from curation.adapter import (
    ACTOR_RETRIES,
    Pool,
    Step,
    StepInfo,
    plan_steps,
    plan_workers,
    worker_factory,
)
from curation.journal import BlockRecord, Journal, block_id
from curation.progress import Progress
from curation.sink import BlockSink, OutputError
from curation.stages.base import Row, Stage, claimed_kind, mark_error

MAX_ATTEMPTS = 3  # runs of a block from its first step before it is split
MAX_BLOCK = 64  # inputs per block at most when the block size is automatic
BLOCKS_PER_WORKER = 16  # automatic block size: about this many blocks per CPU worker
# failed blocks in a row, none committed between, beyond those in flight when a worker died
# (they all fail together): stop the run
MAX_CONSECUTIVE_FAILURES = 8
READY_TIMEOUT_S = 900.0  # workers that cannot start (no resources, a hanging set-up)
TICK_S = 1.0  # the driver wakes at least this often to refresh the progress display


class CurationAborted(RuntimeError):
    """The run cannot go on (the message says why, in one line); committed blocks stay."""


@dataclass
class Block:
    id: str
    rows: list[Row]
    attempt: int = 0
    poisoned: str | None = None  # set once the block is a lone input that failed every time
    stages: dict[str, list[float]] = field(default_factory=dict)
    start: int = 0  # first step (error rows of a poisoned input go straight to the sink)

    @property
    def inputs(self) -> list[str]:
        return [r["input_id"] for r in self.rows]


def make_blocks(rows: Sequence[Row], size: int) -> Iterator[Block]:
    """Consecutive runs of ``size`` input rows, each named by its inputs (``block_id``), made
    as the engine asks for them (``TableRows`` then holds only the blocks in flight as dicts)."""
    for i in range(0, len(rows), size):
        chunk = list(rows[i : i + size])
        yield Block(block_id(r["input_id"] for r in chunk), chunk)


class TableRows(Sequence[Row]):
    """Input rows kept as an Arrow table and made into dicts a slice at a time: ``curate
    select`` feeds a whole index to the engine. On P5's synthetic index 1M rows are 330 MB
    of Arrow and ~2.7 GB as Python dicts; a select over 1M rows peaked at 4.9 GB in the
    driver with every row a dict, 3.3 GB this way (1.6 GB once the pack merged its parts)."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    @overload
    def __getitem__(self, i: int) -> Row: ...
    @overload
    def __getitem__(self, i: slice) -> list[Row]: ...
    def __getitem__(self, i: int | slice) -> Row | list[Row]:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("TableRows slices take every row (step 1)")
            return self.table.slice(start, max(0, stop - start)).to_pylist()
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        return self.table.slice(i % len(self), 1).to_pylist()[0]

    def __iter__(self) -> Iterator[Row]:
        for batch in self.table.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()

    def without(self, inputs: set[str]) -> TableRows:
        """The rows whose ``input_id`` is not in ``inputs``, as a table too."""
        if not inputs:
            return self
        found = pc.is_in(self.table["input_id"], value_set=pa.array(list(inputs), pa.string()))
        return TableRows(self.table.filter(pc.invert(found)))


def uncommitted(rows: Sequence[Row], committed: set[str]) -> Sequence[Row]:
    """The input rows whose input is not in ``committed`` (a list, or ``TableRows``)."""
    if isinstance(rows, TableRows):
        return rows.without(committed)
    return [r for r in rows if r["input_id"] not in committed]


@dataclass
class EngineStats:
    blocks: int = 0
    stages: dict[str, list[float]] = field(default_factory=dict)  # name -> [in, out, seconds]
    retries: int = 0
    failed_inputs: int = 0
    startup_s: float = 0.0  # until every worker finished setup()

    @staticmethod
    def add_stages(target: dict[str, list[float]], stages: dict[str, Any]) -> None:
        for name, (n_in, n_out, secs) in stages.items():
            cur = target.setdefault(name, [0, 0, 0.0])
            cur[0] += n_in
            cur[1] += n_out
            cur[2] += secs


@dataclass
class _Flight:
    block: Block
    step: int
    pool: Pool
    actor: Any
    rows: Any  # ObjectRef of this step's output rows


class Engine:
    def __init__(
        self,
        steps: list[Step],
        pools: dict[str, Pool],
        journal: Journal,
        progress: Any,
        max_in_flight: int,
        max_attempts: int = MAX_ATTEMPTS,
    ):
        self.steps = steps
        self.pools = pools  # "cpu" and one per model step name
        self.journal = journal
        self.progress = progress
        self.max_in_flight = max(1, max_in_flight)
        self.max_attempts = max_attempts
        self.stats = EngineStats()
        self.waiting: dict[Any, _Flight] = {}  # info ref -> its block's step in flight
        self.starting: dict[Any, str] = {}  # ready() ref of each worker -> its pool's name
        self.started_at = time.monotonic()
        self._failures_in_a_row = 0

    def pool_of(self, step: Step) -> Pool:
        return self.pools[step.name] if step.uses_model else self.pools["cpu"]

    def run(self, blocks: Iterable[Block]) -> EngineStats:
        """Run ``blocks`` (taken as there is room in flight); failed blocks go again first."""
        import ray

        fresh = iter(blocks)
        queue: deque[Block] = deque()  # blocks to run again (retries, halves, error rows)
        waiting: dict[Any, _Flight] = self.waiting
        while True:
            while len(waiting) < self.max_in_flight:
                block = queue.popleft() if queue else next(fresh, None)
                if block is None:
                    break
                self._submit(waiting, block, block.start, block.rows)
            if not waiting:
                break
            self._check_started()
            ready, _ = ray.wait(list(self.starting) + list(waiting), num_returns=1, timeout=TICK_S)
            for ref in ready:
                if ref in self.starting:
                    continue  # _check_started reads it next round

                flight = waiting.pop(ref)
                flight.pool.release(flight.actor)
                try:
                    info: StepInfo = ray.get(ref)
                except Exception as e:
                    self._failed(flight, e, queue)
                    continue
                self.stats.add_stages(flight.block.stages, info.stages)
                self.progress.step_done(info)
                if flight.step + 1 < len(self.steps):
                    self._submit(waiting, flight.block, flight.step + 1, flight.rows)
                else:
                    self._commit(flight.block, info)
            self.progress.tick()
        return self.stats

    def _submit(self, waiting: dict, block: Block, step: int, rows: Any) -> None:
        s = self.steps[step]
        pool = self.pool_of(s)
        actor = pool.pick()
        rows_ref, info_ref = actor.run.options(num_returns=2).remote(s.name, block.id, rows)
        waiting[info_ref] = _Flight(block, step, pool, actor, rows_ref)

    def _commit(self, block: Block, info: StepInfo) -> None:
        assert info.written is not None
        record = BlockRecord(block.id, block.inputs, info.written, block.stages)
        self.journal.commit(record)
        self._failures_in_a_row = 0
        self.stats.add_stages(self.stats.stages, block.stages)  # retried attempts not counted
        self.stats.blocks += 1
        self.progress.block_done(record)

    def _check_started(self) -> None:
        """Workers start while the first blocks are already sent to them (Ray queues the calls):
        a set-up error (a model that does not load, a bad setting) stops the run with its own
        exception; workers the cluster cannot start within ``READY_TIMEOUT_S`` stop it too."""
        import ray
        import ray.exceptions as rex

        if not self.starting:
            return
        done, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
        for ref in done:
            self.starting.pop(ref)
            try:
                ray.get(ref)
            except rex.RayTaskError as e:  # set-up raised: its own exception, one message
                raise (getattr(e, "cause", None) or e) from None
            except rex.RayError:
                pass  # the worker died (killed, a poisonous input): its blocks are retried
        if not self.starting:
            self.stats.startup_s = time.monotonic() - self.started_at
        elif time.monotonic() - self.started_at > READY_TIMEOUT_S:
            pools = sorted(set(self.starting.values()))
            raise CurationAborted(
                f"{len(self.starting)} workers ({', '.join(pools)}) did not start within "
                f"{READY_TIMEOUT_S:.0f} s: the cluster may lack the resources they ask for "
                "(see `ray status`), or their set-up hangs"
            )

    def drain(self) -> None:
        """Collect what is still in flight after the run stopped early (the actors are gone
        by then, so this is quick): Ray would log every unread error at exit otherwise. The
        rows are read only where the step failed (then they hold the error, not data)."""
        import ray

        flights = list(self.waiting.items())
        self.waiting.clear()
        if flights:
            ray.wait([ref for ref, _ in flights], num_returns=len(flights), timeout=30)
        for ref, flight in flights:
            try:
                ray.get(ref, timeout=0)
            except Exception:
                with contextlib.suppress(Exception):
                    ray.get(flight.rows, timeout=0)

    def _failed(self, flight: _Flight, error: Exception, queue: deque) -> None:
        import ray
        import ray.exceptions as rex

        with contextlib.suppress(Exception):  # read the rows' error too (see drain)
            ray.get(flight.rows, timeout=0)
        self._check_started()  # a worker that cannot set up fails every block: say why
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, OutputError):
            raise CurationAborted(str(cause)) from None
        if isinstance(error, rex.ActorDiedError):
            flight.pool.replace(flight.actor)  # Ray gave up restarting it
        block = flight.block
        detail = _describe(cause)
        self.stats.retries += 1
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= MAX_CONSECUTIVE_FAILURES + self.max_in_flight:
            raise CurationAborted(
                f"{self._failures_in_a_row} blocks failed in a row, none committed between; "
                f"the last on step {self.steps[flight.step].name}: {detail}"
            )
        block.attempt += 1
        block.stages = {}
        if not _system_failure(error):
            # stage code raised: the same input fails the same way again, so split at once
            block.attempt = max(block.attempt, self.max_attempts)
        if block.poisoned is not None:  # its error rows alone, straight to the sink
            if block.attempt >= self.max_attempts:
                raise CurationAborted(f"block {block.id} cannot be written: {detail}")
            queue.appendleft(block)
            what = f"retrying its error rows ({block.attempt + 1}/{self.max_attempts})"
        elif block.attempt < self.max_attempts:
            queue.appendleft(block)
            what = f"retrying ({block.attempt + 1}/{self.max_attempts})"
        elif len(block.rows) > 1:
            half = len(block.rows) // 2
            for part in (block.rows[half:], block.rows[:half]):
                # each half gets one more try before it is split again
                sub = Block(block_id(r["input_id"] for r in part), part, self.max_attempts - 1)
                queue.appendleft(sub)
            what = f"splitting it into blocks of {half} and {len(block.rows) - half} inputs"
        else:
            # the contract needs a kind on every row; an input that never probed has none
            rows = [
                mark_error({**r, "kind": r.get("kind") or claimed_kind(r)}, "worker_failed", detail)
                for r in block.rows
            ]
            last = len(self.steps) - 1
            queue.appendleft(Block(block.id, rows, 0, poisoned=detail, start=last))
            self.stats.failed_inputs += 1
            what = "recording the input as an error row (worker_failed)"
        self.progress.warn(
            f"block {block.id} ({len(block.rows)} inputs) failed on step "
            f"{self.steps[flight.step].name}: {detail}; {what}"
        )


def _system_failure(error: BaseException) -> bool:
    """A worker or its objects were lost (killed, out of memory, node gone): worth running the
    same block again. Anything else is an exception raised by stage code."""
    import ray.exceptions as rex

    lost = (
        rex.RayActorError,
        rex.WorkerCrashedError,
        rex.ObjectLostError,
        rex.OutOfMemoryError,
        rex.NodeDiedError,
        rex.RaySystemError,
    )
    return isinstance(error, lost) and not isinstance(error, rex.RayTaskError)


def _describe(error: BaseException) -> str:
    """One line: the exception type and the first line of its message."""
    text = str(error).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(error).__name__}: {first[:300]}"


def run_blocks(
    rows: Sequence[Row],
    stages: Sequence[Stage],
    sink: BlockSink,
    journal: Journal,
    *,
    block_size: int | None = None,
    num_inputs: int | None = None,
    address: str | None = None,
    console: Any = None,
    verbose: bool = False,
    max_attempts: int = MAX_ATTEMPTS,
    actor_retries: int = ACTOR_RETRIES,
) -> EngineStats:
    """Start the workers, stream ``rows`` (input rows) through ``stages`` in blocks, each
    committed to ``journal`` once ``sink`` wrote it, stop the workers. ``num_inputs`` counts
    the inputs committed earlier too (for the progress display)."""
    import ray

    connect_ray(address, verbose)
    resources = ray.cluster_resources()
    steps = plan_steps(stages)
    cpu_plan, model_plans = plan_workers(
        [s for s in stages if s.uses_model],
        resources.get("CPU", 1.0),
        resources.get("GPU", 0.0),
        resources.get("memory", 0.0) / 2**20,
    )
    size = block_size or max(
        1, min(MAX_BLOCK, math.ceil(len(rows) / (BLOCKS_PER_WORKER * cpu_plan.size)))
    )
    if console is not None:
        models = "".join(
            f", {name} x{p.size}" + (f" ({p.gpus:g} GPU each)" if p.gpus else "")
            for name, p in model_plans.items()
        )
        console.print(f"workers: {cpu_plan.size} CPU{models}; blocks of {size} inputs")
    cpu_steps = [s for s in steps if not s.uses_model]
    pools: dict[str, Pool] = {}
    engine = None
    try:
        t0 = time.monotonic()
        make = worker_factory(cpu_steps, sink, cpu_plan, "cpu", actor_retries)
        pools["cpu"] = Pool("cpu", make, cpu_plan.size)
        for step in steps:
            if step.uses_model:
                plan = model_plans[step.name]
                make = worker_factory([step], None, plan, step.name, actor_retries)
                pools[step.name] = Pool(step.name, make, plan.size)
        total = num_inputs if num_inputs is not None else len(rows)
        progress = Progress(console, total, total - len(rows))
        in_flight = 2 * cpu_plan.size + sum(p.size for p in model_plans.values())
        engine = Engine(steps, pools, journal, progress, in_flight, max_attempts)
        engine.started_at = t0
        engine.starting = {ref: name for name, pool in pools.items() for ref in pool.ready()}
        progress.start()
        try:
            return engine.run(make_blocks(rows, size))
        finally:
            progress.stop()
    finally:
        for pool in pools.values():
            pool.kill()
        if engine is not None:
            engine.drain()


def connect_ray(address: str | None, verbose: bool = False) -> None:
    """A local Ray (or the cluster at ``address``); Ray's own logs only with ``verbose``."""
    init_ray(
        address,
        log_to_driver=verbose,
        configure_logging=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )
