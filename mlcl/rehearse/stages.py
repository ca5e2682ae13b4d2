"""The stages of a rehearsal, each PASS, FAIL (with the reason) or SKIP (a stage it needs did
not pass), and the instruments they read: the step probe and the peak-memory meter.

Per preset: ``data`` (fabricated or given, checked with the project's verifier) and ``weights``
(the checkpoint loads into the preset's backbone exactly as training loads it). Per method:
``flops`` (one step at the preset's batch, and the projected full run), ``train`` (``fit``
for N steps), ``checkpoint`` (checkpoints/LATEST, best.pt and last.pt load), ``resume`` (``fit``
to 2N steps continues from the checkpoint: N more steps, not 2N) and ``evaluate`` (last.pt
evaluated as ``mlcl evaluate`` does, in the preset's mode, agrees with training's own
evaluation).
"""
from __future__ import annotations

import gc
import math
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mlcl import methods
from mlcl.bench.memory import _reset_peak_rss, _status_kib
from mlcl.errors import RunInterrupted

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
MiB = 2 ** 20


class StageError(RuntimeError):
    """A stage's check did not hold; the message is the reason printed beside FAIL."""


def expect(ok: bool, reason: str) -> None:
    if not ok:
        raise StageError(reason)


@dataclass
class Stage:
    """One line of the rehearsal: ``status`` of ``name`` (for ``method``, or the preset)."""

    preset: str
    name: str
    method: Optional[str]
    status: str
    detail: str
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        who = f"{self.preset}/{self.method}" if self.method else self.preset
        return f"{self.status}  {who:<32s} {self.name:<10s} {self.detail}"


class StageBook:
    """Runs stages, prints a PASS/FAIL/SKIP line for each and keeps them."""

    def __init__(self, preset: str, log: Callable[[str], None] = print):
        self.preset, self.log, self.stages = preset, log, []

    def status(self, name: str, method: Optional[str] = None) -> Optional[str]:
        for s in self.stages:
            if (s.name, s.method) == (name, method):
                return s.status
        return None

    def run(self, name: str, method: Optional[str], fn: Callable[[], tuple[str, dict]],
            needs: tuple[tuple[str, Optional[str]], ...] = ()) -> Optional[dict]:
        """Run ``fn`` -> (detail, data) unless a stage in ``needs`` did not pass; return
        ``data`` on PASS, None otherwise. Any error is the stage's FAIL but a stop signal's
        RunInterrupted (Ctrl-C, SIGTERM), which ends the rehearsal."""
        missing = [f"{n}{'/' + m if m else ''}" for n, m in needs if self.status(n, m) != PASS]
        if missing:
            self.skip(name, method, f"needs {', '.join(missing)}")
            return None
        t0 = time.perf_counter()
        try:
            detail, data = fn()
            stage = Stage(self.preset, name, method, PASS, detail, time.perf_counter() - t0,
                          data)
        except RunInterrupted:  # Ctrl-C / SIGTERM during a run: the rehearsal stops
            raise
        except Exception as e:  # noqa: BLE001 - any failure is this stage's FAIL line
            stage = Stage(self.preset, name, method, FAIL, reason(e), time.perf_counter() - t0,
                          {"traceback": traceback.format_exc()})
        self._add(stage)
        return stage.data if stage.status == PASS else None

    def skip(self, name: str, method: Optional[str], why: str) -> None:
        self._add(Stage(self.preset, name, method, SKIP, why, 0.0))

    def _add(self, stage: Stage) -> None:
        self.stages.append(stage)
        self.log(stage.line())

    @property
    def ok(self) -> bool:
        return bool(self.stages) and all(s.status == PASS for s in self.stages)


def reason(e: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line, shortened to ``limit`` characters."""
    text = " ".join(str(e).split()) or "(no message)"
    text = text if isinstance(e, StageError) else f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- instruments
class StepProbe:
    """While active, every call the training loop makes to ``mlcl.methods.STEPS[method]`` is
    counted and timed (start to start, the device synchronised) and its loss kept."""

    def __init__(self, method: str, device: torch.device):
        self.method, self.device = method, device
        self.starts: list[float] = []  # wall clock
        self.cpu_starts: list[float] = []  # this process's CPU time (not its loader workers')
        self.losses: list[float] = []

    def __enter__(self) -> "StepProbe":
        self.original = methods.STEPS[self.method]

        def probe(model, batch, ctx):
            _sync(self.device)
            self.starts.append(time.perf_counter())
            self.cpu_starts.append(time.process_time())
            terms = self.original(model, batch, ctx)
            self.losses.append(float(terms["loss"].detach()))
            return terms

        methods.STEPS[self.method] = probe
        return self

    def __exit__(self, *exc) -> None:
        methods.STEPS[self.method] = self.original

    @property
    def calls(self) -> int:
        return len(self.starts)

    def intervals(self, cpu: bool = False) -> list[float]:
        """Seconds (wall, or this process's CPU) between consecutive steps, the first
        (warm-up) left out when there are more: one full iteration each."""
        t = self.cpu_starts if cpu else self.starts
        gaps = [b - a for a, b in zip(t, t[1:])]
        return gaps[1:] if len(gaps) > 1 else gaps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of this process: on GPU the tensors' (``max_memory_allocated``, and what
    the caching allocator reserved); on CPU the resident set (VmHWM, reset per stage)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        gc.collect()  # what an earlier stage left behind is not this stage's
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / MiB
        else:
            _reset_peak_rss()

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"peak_mb": torch.cuda.max_memory_allocated(self.device) / MiB,
                    "reserved_mb": torch.cuda.max_memory_reserved(self.device) / MiB,
                    "base_mb": self.base_mb,
                    "what": "GPU: torch.cuda.max_memory_allocated (reserved beside it)"}
        kib = _status_kib("VmHWM")
        return {"peak_mb": kib / 1024 if kib is not None else math.nan,
                "what": "CPU: peak resident set of the process (VmHWM), not GPU memory"}


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def latest_checkpoint(out: Path) -> str:
    """The folder name checkpoints/LATEST points to (StageError when there is none)."""
    pointer = out / "checkpoints" / "LATEST"
    expect(pointer.is_file(), f"{pointer} was not written")
    name = pointer.read_text().strip()
    expect((out / "checkpoints" / name).is_dir(),
           f"{pointer} names {name!r}, which is not a folder of {out / 'checkpoints'}")
    return name
