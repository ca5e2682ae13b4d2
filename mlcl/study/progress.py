"""Live progress of the runs reproduce trains: each waiting worker polls its run's
``progress.json`` onto a :class:`Board`, a tqdm bar per run on a terminal, else a plain line
every ``every`` seconds; messages go through :meth:`Board.write`, never onto a bar."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from tqdm import tqdm

from mlcl.outputs import read_progress


def eta_s(p: dict[str, Any]) -> float | None:
    """Seconds left at the run's average pace so far (None before the first iteration)."""
    it, total, elapsed = p.get("iteration") or 0, p.get("total_iters") or 0, p.get("elapsed_s")
    if it <= 0 or not total or elapsed is None:
        return None
    return max(total - it, 0) * float(elapsed) / it


def clock(seconds: float | None) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on); ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def describe(p: dict[str, Any] | None) -> str:
    """``val mIoU 45.21 (best 46.03), ETA 1:40`` for a progress record (None: starting)."""
    if p is None:
        return "starting (Python, data, model)"
    miou, best = p.get("miou"), p.get("best_miou")
    val = "val mIoU -" if miou is None else f"val mIoU {miou:.2f}"
    if best is not None and miou is not None and best != miou:
        val += f" (best {best:.2f})"
    status = p.get("status", "running")
    return f"{val}, ETA {clock(eta_s(p))}" if status == "running" else f"{val}, {status}"


class Tracker(contextlib.AbstractContextManager):
    """The display of one running run in bar ``position``; a context manager that closes it."""

    def __init__(self, board: "Board", name: str, output_dir: Path, position: int):
        self.board, self.name, self.output_dir, self.position = board, name, output_dir, position
        self.last_line, self.bar = -float("inf"), None
        if board.tty:
            self.bar = tqdm(total=1, desc=name, position=position, leave=False,
                            file=board.stream, dynamic_ncols=True, mininterval=0,
                            bar_format="{desc} {bar:20} {n}/{total} it{postfix}")
            self.bar.set_postfix_str(describe(None), refresh=True)

    def poll(self) -> None:
        """Show the run's latest progress.json: redraw the bar, or print a plain line."""
        p = read_progress(self.output_dir)
        if self.bar is not None:
            if p is not None:
                self.bar.total = max(int(p.get("total_iters") or 1), 1)
                self.bar.n = int(p.get("iteration") or 0)
            self.bar.set_postfix_str(describe(p), refresh=True)
        elif p is not None and time.monotonic() - self.last_line >= self.board.every:
            self.last_line = time.monotonic()
            self.board.write(f"  ...     {self.name}: iteration {p.get('iteration')}/"
                             f"{p.get('total_iters')}, {describe(p)}")

    def close(self) -> None:
        """Remove the bar and free its position for the next run."""
        if self.bar is not None:
            self.bar.close()
            # a bar below the first leaves the cursor where its text ended: back to column 0
            self.board.stream.write("\r")
        with self.board.lock:
            self.board.taken.discard(self.position)

    def __exit__(self, *exc) -> None:
        self.close()


class Board:
    """What the terminal shows while reproduce's workers train: bars when ``tty`` (default:
    ``stream`` is a terminal), else a plain line per run every ``every`` seconds."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, every: float = 30.0):
        self._stream = stream
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.every = every
        self.lock = threading.Lock()
        self.taken: set[int] = set()

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout  # looked up late: tests capture sys.stdout

    def track(self, name: str, output_dir: str | Path) -> Tracker:
        """A tracker in the lowest free bar position."""
        with self.lock:
            position = min(set(range(len(self.taken) + 1)) - self.taken)
            self.taken.add(position)
        return Tracker(self, name, Path(output_dir), position)

    def write(self, message: str) -> None:
        """Print a message on its own line, above the bars."""
        with self.lock:
            if self.tty:
                tqdm.write(message, file=self.stream)
            else:
                print(message, file=self.stream, flush=True)


def wait(proc: subprocess.Popen, poll: Callable[[], None] | None = None,
         interval: float = 1.0) -> int:
    """The exit status of ``proc``, ``poll()`` called every ``interval`` s meanwhile."""
    while True:
        try:
            return proc.wait(timeout=interval)
        except subprocess.TimeoutExpired:
            if poll is not None:
                poll()
