"""The common harness: result rows, timing (warm-up + repeats + median) and the ``Context`` a
case gets (sizes, repeat counts, folders).

A figure is the median of ``repeats`` timed runs after ``warmup`` untimed ones; ours and its
baseline are measured in the same process, on the same inputs, one after the other. A row holds
one figure, its baseline and the goal; whether the goal is met is printed, never enforced.
The machine description is ``bench.machine``, the peak memory of a case's process tree
``bench.memory``, the printed table and the JSON / markdown files ``bench.tables``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / "work"  # cached inputs (clip set, shards, 10M-row index); gitignored
RESULTS = BENCH_DIR / "results"


# -- rows ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One printed line: a figure of ours, the baseline it is compared with, and the goal.

    ``ratio`` is always "ours relative to the baseline" in the direction the goal reads
    (a speed-up for throughputs, a slowdown factor for overheads); ``goal_on`` says whether the
    goal applies to ``ratio`` or to ``value`` (absolute goals such as "<= 2 s").
    """

    case: str
    metric: str
    value: float | None = None
    unit: str = ""
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    goal: str | None = None  # ">= 1.0", "<= 0.05": operator and number
    goal_on: str = "ratio"  # "ratio" | "value"
    met: bool | None = None
    note: str = ""
    error: str | None = None

    def __post_init__(self) -> None:
        if self.met is None and self.goal and self.error is None:
            target = self.ratio if self.goal_on == "ratio" else self.value
            self.met = check_goal(target, self.goal)


def check_goal(value: float | None, goal: str) -> bool | None:
    """``check_goal(1.2, ">= 1.0") -> True``; None when there is no value."""
    if value is None:
        return None
    op, number = goal.split()
    target = float(number)
    return value >= target if op == ">=" else value <= target


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def rows_to_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


# -- timing -------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds of each timed run, and their median."""

    runs: list[float] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)  # what each timed run returned

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "runs_s": self.runs}


def timed(
    fn: Callable[[], Any],
    *,
    warmup: int,
    repeats: int,
    setup: Callable[[], Any] | None = None,
    label: str = "",
) -> Timing:
    """Run ``setup`` (untimed) then ``fn`` (timed) ``warmup + repeats`` times; keep the last
    ``repeats`` timings."""
    t = Timing()
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
        kind = "warm-up" if i < warmup else f"run {i - warmup + 1}/{repeats}"
        log(f"  {label} {kind}: {elapsed:.2f} s")
        if i >= warmup:
            t.runs.append(elapsed)
            t.extra.append(out)
    return t


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Context:
    """What a case gets: sizes (quick or full), repeat counts and its folders."""

    quick: bool = False
    repeats: int = 3
    warmup: int = 1
    details: dict[str, Any] = field(default_factory=dict)  # extra figures for latest.json
    partial_path: Path | None = None  # where rows finished so far are kept (case timeout)

    def save_partial(self, rows: list[Row]) -> None:
        """Keep the rows measured so far: a case killed by its timeout still reports them."""
        if self.partial_path is not None:
            payload = {"rows": rows_to_json(rows), "details": self.details}
            self.partial_path.write_text(json.dumps(payload, default=str))

    @property
    def work(self) -> Path:
        WORK.mkdir(parents=True, exist_ok=True)
        return WORK

    def tmp(self, name: str) -> Path:
        """A fresh scratch folder (removed first) under bench/work/tmp/."""
        import shutil

        path = WORK / "tmp" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def time(
        self,
        fn,
        *,
        setup=None,
        label: str = "",
        repeats: int | None = None,
        warmup: int | None = None,
    ) -> Timing:
        return timed(
            fn,
            warmup=self.warmup if warmup is None else warmup,
            repeats=self.repeats if repeats is None else repeats,
            setup=setup,
            label=label,
        )
