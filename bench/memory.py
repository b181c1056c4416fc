"""Peak memory of a case: the summed PSS of its whole process tree (Ray workers, Pool
children, subprocesses), sampled by a thread (``TreeMemory``), and the process's own
``ru_maxrss``; ``process_tree`` also tells what to kill with a case."""

from __future__ import annotations

import os
import resource
import threading


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


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (parents before their children)."""
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
            total = sum(_pss_kib(p) for p in process_tree(self.pid))
            self.peak_kib = max(self.peak_kib, total)
            self._halt.wait(self.interval)

    def stop(self) -> float:
        self._halt.set()
        self.join(timeout=5)
        return round(self.peak_kib / 1024, 1)


def self_max_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
