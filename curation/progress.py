"""Progress of a curation run: one display of our own, fed by the engine's events.

On a terminal: a live panel (rich) with inputs done / total, accepted / rejected / error so
far, samples per second, ETA, and per stage the rows in / out and worker seconds. Off a
terminal (job logs, CI): one plain line every ``interval_s`` seconds and at the end. Warnings
(a block retried after a worker died, ...) are printed as they happen in both modes.
"""

from __future__ import annotations

import time
from typing import Any

from core.fmt import clock
from curation.adapter import StepInfo
from curation.journal import BlockRecord

PLAIN_INTERVAL_S = 10.0


class Progress:
    def __init__(
        self,
        console: Any,
        total: int,
        skipped: int = 0,
        interval_s: float = PLAIN_INTERVAL_S,
        live: bool | None = None,
    ):
        self.console = console
        self.total = total
        self.skipped = skipped
        self.interval_s = interval_s
        self.done = 0
        self.counts = {"accepted": 0, "rejected": 0, "error": 0}
        self.stages: dict[str, list[float]] = {}
        self.start_t = time.monotonic()
        self.last_line = self.start_t
        self.warnings = 0
        tty = bool(console is not None and getattr(console, "is_terminal", False))
        self.live_mode = tty if live is None else live
        self._live: Any = None

    # -- events --------------------------------------------------------------------------------

    def start(self) -> None:
        if self.console is None:
            return
        if self.live_mode:
            from rich.live import Live

            self._live = Live(self._render(), console=self.console, refresh_per_second=2)
            self._live.start()
        else:
            self.console.print(self.line())

    def step_done(self, info: StepInfo) -> None:
        for name, (n_in, n_out, secs) in info.stages.items():
            cur = self.stages.setdefault(name, [0, 0, 0.0])
            cur[0] += n_in
            cur[1] += n_out
            cur[2] += secs

    def block_done(self, record: BlockRecord) -> None:
        self.done += len(record.inputs)
        for status, n in record.written.counts.items():
            self.counts[status] = self.counts.get(status, 0) + n

    def warn(self, message: str) -> None:
        self.warnings += 1
        if self.console is not None:
            from rich.text import Text

            self.console.print(
                Text.assemble(("warning", "yellow"), f": {message}"), highlight=False
            )

    def tick(self) -> None:
        if self.console is None:
            return
        if self._live is not None:
            self._live.update(self._render())
        elif time.monotonic() - self.last_line >= self.interval_s:
            self.last_line = time.monotonic()
            self.console.print(self.line(), highlight=False)

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live = None
        elif self.console is not None:
            self.console.print(self.line(), highlight=False)

    # -- rendering -----------------------------------------------------------------------------

    def rates(self) -> tuple[float, float | None]:
        """(samples per second, seconds left or None while nothing is committed)."""
        elapsed = max(time.monotonic() - self.start_t, 1e-9)
        samples = sum(self.counts.values())
        left = self.total - self.skipped - self.done
        eta = left * elapsed / self.done if self.done else None
        return samples / elapsed, eta

    def line(self) -> str:
        rate, eta = self.rates()
        done = self.skipped + self.done
        pct = 100.0 * done / self.total if self.total else 100.0
        c = self.counts
        return (
            f"curate: {done}/{self.total} inputs ({pct:.0f}%)"
            + (f", {self.skipped} from earlier runs" if self.skipped else "")
            + f" | {c['accepted']} accepted, {c['rejected']} rejected, {c['error']} error"
            + f" | {rate:.2f} samples/s | elapsed {clock(time.monotonic() - self.start_t)}"
            + (f", ETA {clock(eta)}" if eta is not None and done < self.total else "")
        )

    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        done = self.skipped + self.done
        bar = ProgressBar(total=max(self.total, 1), completed=done, width=40)
        table = Table(box=None, padding=(0, 2), show_header=True, header_style="dim")
        for col in ("stage", "rows in", "rows out", "worker s"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for name, (n_in, n_out, secs) in self.stages.items():
            table.add_row(name, str(int(n_in)), str(int(n_out)), f"{secs:.1f}")
        return Group(bar, Text(self.line()), table)
