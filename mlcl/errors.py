"""How a command ends on an error: one line on stderr, ``error: <file, key or flag>: <why>``,
and an exit status (docs/bad_input.md); ``MLCL_DEBUG=1`` shows the traceback instead.
Every subcommand of ``python -m mlcl`` ends through :func:`run_reported`; this module loads
no heavy library (nor torch), so that every command reports its errors without loading them."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

BAD_INPUT_EXIT = 2


class MlclError(Exception):
    """An error for the user: one line naming the file, key or flag and how to fix it.
    ``exit_code``: 2 bad input (the default), 1 a step that failed for another reason;
    ``report`` is false on all processes of a run but the main one (one line per run)."""

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
    """argparse, with a bad flag reported as one line,
    ``error: <command>: <why> (see <command> --help)``, and exit status 2 (not the usage
    block); ``add_subparsers`` makes parsers of this class too."""

    def error(self, message: str):
        self.exit(BAD_INPUT_EXIT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def error_line(e: BaseException) -> str:
    """An error's one line: the message (the original one for an error re-raised from a data
    loader worker), or for an OS error the file and the reason."""
    from mlcl.data.splits import original_message  # torch-free; mlcl.data loads lazily

    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = original_message(str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_reported(command: Callable[[], int | None]) -> int:
    """``command()``'s exit status (None: 0); for an :class:`MlclError`, an OSError or
    ValueError (bad input) or Ctrl-C, its line on stderr and its status. Any other error
    propagates with its traceback: a bug, not bad input."""
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
