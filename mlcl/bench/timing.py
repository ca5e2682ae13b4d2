"""Clocks and repeat scheduling of the benchmark: CUDA events on GPU, wall and process CPU
time on CPU; jobs that take turns round after round so that load from other processes falls
on all of them alike."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds between marks: CUDA events on GPU, perf_counter on CPU; on CPU also the
    process's CPU time, which other processes competing for the cores disturb less."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.cpu: list[float] = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())

    def laps(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    def cpu_total(self) -> float | None:
        return self.cpu[-1] - self.cpu[0] if self.cpu else None


def stats(samples: list[float]) -> dict[str, Any]:
    """Median and spread of timings (seconds)."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2],
            "n": len(s), "samples": [round(x, 5) for x in samples]}


def lap_stats(laps: list[dict[str, Any]], clock: str) -> dict[str, Any]:
    """Stats of the chosen clock at the top level, of every recorded clock below it."""
    out = {**stats([lap[clock] for lap in laps]), "clock": clock}
    for key in ("wall", "cpu", "forward", "backward"):
        if laps and laps[0].get(key) is not None:
            out[key] = stats([lap[key] for lap in laps])
    return out


def interleaved(jobs: dict[str, Callable[[], Any]], plan: dict[str, tuple[int, int]]
                ) -> dict[str, list[Any]]:
    """Run the jobs in turn, round after round; ``plan[name] = (warmup, repeats)``. A job
    with fewer runs than the longest joins in the last rounds. Returns each job's results
    of its ``repeats`` runs after its warm-up."""
    out: dict[str, list[Any]] = {k: [] for k in jobs}
    rounds = max(w + n for w, n in plan.values())
    for r in range(rounds):
        for name, job in jobs.items():
            w, n = plan[name]
            first = rounds - w - n
            if r < first:
                continue
            result = job()
            if r >= first + w:
                out[name].append(result)
    return out

