"""The common harness: timing (warm-up + repeats + median), result rows, machine description,
peak memory of a case's process tree, and the JSON / markdown writers.

A figure is the median of ``repeats`` timed runs after ``warmup`` untimed ones; ours and its
baseline are measured in the same process, on the same inputs, one after the other. A row holds
one figure, its baseline and the goal; whether the goal is met is printed, never enforced.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
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


# -- machine ------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, versions, load, date: printed with every result file."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": _mem_total_gib(),
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in ("torch", "ray", "deepspeed", "pyarrow", "pandas", "av", "decord", "numpy")
        },
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "commit": _git_commit(),
    }


def _gpu() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a description, not a requirement
        pass
    return None


def machine_line(m: dict[str, Any]) -> str:
    v = m.get("versions", {})
    return (
        f"{m['cpu']}, {m['usable_cores']} of {m['cores']} cores, {m['ram_gib']} GiB RAM, "
        f"GPU {m.get('gpu') or 'none'}; Python {m['python']}, torch {v.get('torch')}, "
        f"ray {v.get('ray')}, deepspeed {v.get('deepspeed')}, pyarrow {v.get('pyarrow')}; "
        f"commit {m.get('commit')}; load at start {_fmt_load(m.get('load_avg_at_start'))}"
    )


def _fmt_load(load: list[float] | None) -> str:
    return "/".join(f"{x:.2f}" for x in load) if load else "?"


# -- memory -------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def _tree(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split between their users), else RSS."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError):
        return 0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of a process and all its descendants (Ray workers, Pool
    children, the Data-Juicer subprocess) every ``interval`` seconds; ``peak_mb`` is the max.

    PSS splits shared pages (Ray's object store, forked copy-on-write memory) between the
    processes that map them, so the sum does not count them twice. A sampler misses spikes
    shorter than its interval; the case process's own ``ru_maxrss`` is reported beside it.
    """

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self._halt = threading.Event()

    def run(self) -> None:
        if not os.path.isdir("/proc"):
            return
        while not self._halt.is_set():
            total = sum(_pss_kib(p) for p in _tree(self.pid))
            self.peak_kib = max(self.peak_kib, total)
            self._halt.wait(self.interval)

    def stop(self) -> float:
        self._halt.set()
        self.join(timeout=5)
        return round(self.peak_kib / 1024, 1)


def self_max_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# -- output -------------------------------------------------------------------------------------


def fmt_num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "%":
        return f"{x * 100:.2f} %"
    if abs(x) >= 1000:
        s = f"{x:,.0f}"
    elif abs(x) >= 100:
        s = f"{x:.1f}"
    elif abs(x) >= 1:
        s = f"{x:.2f}"
    else:
        s = f"{x:.3g}"
    return f"{s} {unit}".strip()


def fmt_goal(row: Row) -> str:
    if not row.goal:
        return "-"
    op, number = row.goal.split()
    op = {">=": "≥", "<=": "≤"}[op]
    if row.goal_on == "ratio":
        return f"{op} {float(number):g}x"
    if row.unit == "%":
        return f"{op} {float(number) * 100:g} %"
    return f"{op} {float(number):g} {row.unit}".strip()


def fmt_met(row: Row) -> str:
    if row.error:
        return "ERROR"
    if row.met is None:
        return "-"
    return "yes" if row.met else "NO"


COLUMNS = (
    "case",
    "metric",
    "ours",
    "baseline",
    "baseline value",
    "ratio",
    "goal",
    "met",
    "peak MB",
)


def row_cells(row: Row, peak_mb: float | None) -> list[str]:
    if row.error:
        return [
            row.case,
            row.metric,
            "no figure",
            row.baseline or "-",
            fmt_num(row.baseline_value, row.unit),
            "-",
            fmt_goal(row),
            "ERROR",
            fmt_num(peak_mb),
        ]
    return [
        row.case,
        row.metric,
        fmt_num(row.value, row.unit),
        row.baseline or "-",
        fmt_num(row.baseline_value, row.unit),
        "-" if row.ratio is None else f"{row.ratio:.2f}x",
        fmt_goal(row),
        fmt_met(row),
        fmt_num(peak_mb),
    ]


def print_row(row: Row, peak_mb: float | None = None) -> None:
    cells = row_cells(row, peak_mb)
    print(
        f"{cells[0]:<8} {cells[1]:<44} {cells[2]:>16}  vs {cells[3]:<34} {cells[4]:>14}  "
        f"ratio {cells[5]:>7}  goal {cells[6]:<9} met {cells[7]}",
        flush=True,
    )
    if row.error:
        print(f"         error: {row.error}", flush=True)
    elif row.note:
        print(f"         ({row.note})", flush=True)


def write_results(out_dir: Path, payload: dict[str, Any], stem: str = "latest") -> list[Path]:
    """``STEM.json`` (everything) and ``STEM.md`` (the table + notes) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(payload))
    return [js, md]


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        f"# omniforge benchmarks ({'quick' if payload.get('quick') else 'full'} run)",
        "",
        f"- date: {m['date']}",
        f"- machine: {machine_line(m)}",
        f"- command: `{payload.get('command')}`; {payload.get('repeats')} timed repeat(s) "
        f"after {payload.get('warmup')} warm-up, median shown; total {payload['elapsed_s']:.0f} s",
        "- ratio: ours relative to the baseline measured in the same run (throughput: ours / "
        "baseline; overhead: ours / baseline time); goals are printed, never enforced",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    notes = []
    for name, case in payload["cases"].items():
        for r in case["rows"]:
            row = Row(**r)
            cells = row_cells(row, case.get("peak_mb"))
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            if row.error:
                notes.append(f"- **{name} / {row.metric}**: no figure: {row.error}")
            elif row.note:
                notes.append(f"- {name} / {row.metric}: {row.note}")
    lines += ["", "Notes:", "", *notes, ""]
    lines.append(
        "Peak MB: summed PSS of the case's process tree (Ray workers, Pool children, "
        "subprocesses), sampled every 0.25 s; see `peak_mb` / `self_max_rss_mb` in the JSON."
    )
    return "\n".join(lines) + "\n"


def rows_to_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
