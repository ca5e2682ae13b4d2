"""How a command ends on an error: one line on stderr, ``error: <file, key or flag>: <why>``,
and an exit status (docs/bad_input.md); torch-free, so that every command can use it."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

BAD_INPUT_EXIT = 2


class MlclError(Exception):
    """One line for the user naming the file, key or flag and the fix; ``exit_code``: 2 bad
    input, 1 another failure; ``report``: false on a run's processes but the main one."""

    exit_code = BAD_INPUT_EXIT
    report = True

    def __init__(self, message: str = "", exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class RunStopped(MlclError):
    """The run stopped before its end (exit status 1 unless a subclass says otherwise)."""

    exit_code = 1


class RunInterrupted(RunStopped):
    """A stop signal ended the run (after a checkpoint, for training); the same command
    resumes it. Its line is the message itself, not an error; status 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, 128 + signum)  # the shell's convention: 130 Ctrl-C, 143 TERM


class RunDiverged(RunStopped):
    """A non-finite loss term or gradient norm; nothing after it was saved."""

    exit_code = 3


class CommandLineParser(argparse.ArgumentParser):
    """argparse, reporting a bad flag in one line (not the usage block), exit status 2."""

    def error(self, message: str):
        self.exit(BAD_INPUT_EXIT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def error_line(e: BaseException) -> str:
    """An error's one line: its message (a loader worker's original), or an OSError's file: why."""
    from mlcl.data.splits import original_message  # torch-free; mlcl.data loads lazily

    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = original_message(str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_reported(command: Callable[[], int | None]) -> int:
    """``command()``'s exit status (None: 0); an MlclError, OSError, ValueError or Ctrl-C: its
    line on stderr and status (``MLCL_DEBUG=1``: the traceback); other errors (bugs) raise."""
    try:
        return command() or 0
    except KeyboardInterrupt:  # outside a training loop, whose StopSignals take Ctrl-C
        print("interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except (MlclError, OSError, ValueError) as e:
        if os.environ.get("MLCL_DEBUG") and not isinstance(e, RunStopped):
            raise
        if getattr(e, "report", True):
            line = str(e) if isinstance(e, RunInterrupted) else f"error: {error_line(e)}"
            print(line, file=sys.stderr, flush=True)
        return getattr(e, "exit_code", BAD_INPUT_EXIT)
