"""The progress line: rewritten in place on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from coordinator.control.accounting import Progress


def _fmt_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_progress(p: Progress) -> str:
    loss = f"{p.loss:.4f}" if p.loss is not None else "-"
    rate = f"{p.steps_per_s:.1f}" if p.steps_per_s else "-"
    gnorm = f" | gnorm {p.grad_norm:.3g}" if p.grad_norm is not None else ""
    ev = f" | eval {p.eval_loss:.4f}" if p.eval_loss is not None else ""
    return (f"step {p.step}/{p.total} | loss {loss}{gnorm}{ev} | {rate} steps/s | "
            f"world {p.world_size} | ETA {_fmt_eta(p.eta_s)}")


class ProgressReporter:
    def __init__(self, stream: TextIO = sys.stdout, interval_s: float = 5.0,
                 tty: Optional[bool] = None):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval_s = interval_s
        self._last_t = 0.0
        self._last_step = -1
        self._open_line = False

    def update(self, p: Progress) -> None:
        now = time.monotonic()
        if self.tty:
            if p.step != self._last_step:
                self.stream.write("\r\033[K" + format_progress(p))
                self.stream.flush()
                self._open_line = True
        elif p.step != self._last_step and (now - self._last_t >= self.interval_s
                                            or p.step == p.total):
            self.stream.write(format_progress(p) + "\n")
            self.stream.flush()
            self._last_t = now
        self._last_step = p.step

    def message(self, text: str) -> None:
        """A line of its own, without tearing the progress line."""
        self.close_line()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
