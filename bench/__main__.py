"""``python -m bench [CASE ...] [--quick] [--repeats N]``: run benchmark cases, print every ratio
with its goal, write ``bench/results/latest.{json,md}``.

Each case runs in its own subprocess (``--run-case``), so Ray, DeepSpeed and the Pool baselines
of one case never share a process with another, and the peak memory of the case's whole process
tree is measured from here. A case that crashes is reported as crashed, with its error, and the
others still run; the exit status is non-zero only when the harness itself fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from bench.harness import REPO, RESULTS, WORK, Context, Row, rows_to_json
from bench.machine import machine_info, machine_line
from bench.memory import TreeMemory, process_tree, self_max_rss_mb
from bench.tables import print_row, write_results

# case name -> module; the order `make bench` runs them in
CASES = {
    "p1": "bench.p1_curation",
    "p1-resume": "bench.p1_resume",
    "p1-peer": "bench.p1_peer",
    "p2": "bench.p2_shards",
    "p3": "bench.p3_training",
    "p4": "bench.p4_buckets",
    "p5": "bench.p5_selection",
    "p6": "bench.p6_dedup",
    "p7": "bench.p7_split",
}
# a safety net for a hung case, not a goal: P1 alone takes ~15 min on a 2-CPU machine whose
# CPU runs PP-OCR slowly (bench/README.md)
CASE_TIMEOUT_S = {"full": 1800, "quick": 600}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", help=f"cases to run (default: all): {', '.join(CASES)}")
    p.add_argument("--quick", action="store_true", help="1 repeat, small sizes (smoke check)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="results folder (default bench/results for a full run of every case, else "
        "bench/results/tmp)",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--run-case", default=None, help=argparse.SUPPRESS)  # internal: child mode
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_case_child(args: argparse.Namespace) -> int:
    """Child mode: run one case in this process and write its rows as JSON."""
    name = args.run_case
    ctx = Context(
        quick=args.quick,
        repeats=args.repeats or (1 if args.quick else 3),
        warmup=args.warmup,
        partial_path=args.result.with_suffix(".partial.json"),
    )
    start = time.monotonic()
    try:
        module = importlib.import_module(CASES[name])
        rows = module.run(ctx)
    except BaseException as e:  # noqa: BLE001 - reported as a crashed case, never raised
        traceback.print_exc()
        rows = [Row(case=name, metric="(case)", error=f"{type(e).__name__}: {e}"[:2000])]
    payload = {
        "rows": rows_to_json(rows),
        "details": ctx.details,
        "elapsed_s": round(time.monotonic() - start, 1),
        "self_max_rss_mb": self_max_rss_mb(),
    }
    args.result.write_text(json.dumps(payload, default=str))
    return 0


def run_case(name: str, args: argparse.Namespace, log_dir: Path) -> dict:
    """Parent mode: run one case in a subprocess, sample its tree's memory, collect rows."""
    result = WORK / "tmp" / f"result-{name}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    result.with_suffix(".partial.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench", "--run-case", name, "--result", str(result)]
    cmd += ["--warmup", str(args.warmup)]
    if args.quick:
        cmd.append("--quick")
    if args.repeats:
        cmd += ["--repeats", str(args.repeats)]
    log_path = log_dir / f"{name}.log"
    timeout = CASE_TIMEOUT_S["quick" if args.quick else "full"]
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.setdefault("RAY_DEDUP_LOGS", "0")
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = TreeMemory(proc.pid)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            rc = "timeout"
        peak = sampler.stop()
    elapsed = round(time.monotonic() - start, 1)
    if rc == 0 and result.exists():
        data = json.loads(result.read_text())
        data["peak_mb"] = max(peak, data.get("self_max_rss_mb") or 0.0)
        data["log"] = str(log_path)
        data["wall_s"] = elapsed
        return data
    tail = _tail(log_path, 6)
    why = f"timed out after {timeout} s" if rc == "timeout" else f"exit status {rc}"
    row = Row(case=name, metric="(case)", error=f"case process {why}; log {log_path}: {tail}")
    partial = result.with_suffix(".partial.json")
    done = json.loads(partial.read_text()) if partial.exists() else {"rows": []}
    rows = done["rows"] + rows_to_json([row])
    return {
        "rows": rows,
        "details": done.get("details"),
        "peak_mb": peak,
        "wall_s": elapsed,
        "log": str(log_path),
    }


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in reversed(process_tree(proc.pid)):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    proc.wait()


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-n:])[-1500:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_case:
        return run_case_child(args)
    if args.list:
        for name, module in CASES.items():
            doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]
            print(f"{name:<8} {doc}")
        return 0
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}", file=sys.stderr)
        return 2
    names = args.cases or list(CASES)
    everything = not args.cases and not args.quick
    out_dir = args.output or (RESULTS if everything else RESULTS / "tmp")
    log_dir = WORK / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(f"machine: {machine_line(machine)}", flush=True)
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"cases: {', '.join(names)}; {repeats} repeat(s) after {args.warmup} warm-up; "
          f"logs in {log_dir}", flush=True)  # fmt: skip
    start = time.monotonic()
    cases = {}
    for name in names:
        print(f"\n== {name} ({CASES[name]})", flush=True)
        case = run_case(name, args, log_dir)
        cases[name] = case
        for r in case["rows"]:
            print_row(Row(**r), case.get("peak_mb"))
        print(f"   [{name}: {case.get('wall_s')} s, peak {case.get('peak_mb')} MB]", flush=True)
    payload = {
        "machine": machine,
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "quick": args.quick,
        "repeats": repeats,
        "warmup": args.warmup,
        "elapsed_s": round(time.monotonic() - start, 1),
        "cases": cases,
    }
    written = write_results(out_dir, payload)
    if everything:  # a dated copy next to latest, for the history
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d")
        cores = machine.get("usable_cores")
        written += write_results(out_dir / "history", payload, f"{stamp}-{cores}cpu")
    print(f"\ntotal {payload['elapsed_s']:.0f} s; wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
