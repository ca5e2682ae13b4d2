"""How a command ends on an error: one line on stderr, ``error: <file, key or flag>: <why>``,
and an exit status; no traceback (``MLCL_DEBUG=1`` shows it, a stopped run excepted).

Every error mlcl raises for its user is an :class:`MlclError`; its ``exit_code`` is the status:
2 for bad input (configuration, data, files, flags: the default), 1 for a step that failed
for another reason (a download, a checkpoint not written), 3 for a diverged run, 128 + the
signal for a run stopped by one after its checkpoint (130 Ctrl-C, 143 SIGTERM). The standard
library's OSError and ValueError (a missing file, an unreadable image) count as bad input.

:func:`run_reported` turns an error into its line and status; ``python -m mlcl`` ends every
subcommand through it, ``data`` and ``bench`` included, and :class:`CommandLineParser`
reports a bad flag the same way. This module loads no heavy library (nor torch), so that
every command reports its errors without loading them.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

BAD_INPUT_EXIT = 2


class MlclError(Exception):
    """An error for the user: the message is one line naming the file, key or flag and how to
    fix it; ``exit_code`` is the command's status (module docstring); ``report`` is false on
    all processes of a run but the main one (one line per run, not per process)."""

    exit_code = BAD_INPUT_EXIT
    report = True

    def __init__(self, message: str = "", exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    def line(self) -> str:
        """The line shown on stderr."""
        return f"error: {error_line(self)}"


class RunStopped(MlclError):
    """The run stopped before its end (exit status 1 unless a subclass says otherwise)."""

    exit_code = 1


class RunInterrupted(RunStopped):
    """A stop signal ended the run (after a checkpoint, for training); the same command
    resumes it. Its line is the message itself, not an error."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, 128 + signum)  # the shell's convention: 130 Ctrl-C, 143 TERM

    def line(self) -> str:
        return str(self)


class RunDiverged(RunStopped):
    """A non-finite loss term or gradient norm; nothing after it was saved."""

    exit_code = 3


class CommandLineParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported like every other bad input: one line,
    ``error: <command>: <why> (see <command> --help)``, exit status 2 (not the usage block).
    Sub-command parsers made by ``add_subparsers`` are of this class too."""

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
    """``command()``'s exit status (None: 0), or for an :class:`MlclError`, a bad-input
    OSError / ValueError or Ctrl-C its line on stderr and its status (module docstring).
    Any other error propagates with its traceback: a bug, not bad input."""
    try:
        return command() or 0
    except KeyboardInterrupt:  # outside a training loop, whose StopSignals take Ctrl-C
        print("interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except (MlclError, OSError, ValueError) as e:
        if os.environ.get("MLCL_DEBUG") and not isinstance(e, RunStopped):
            raise
        if getattr(e, "report", True):
            line = e.line() if isinstance(e, MlclError) else f"error: {error_line(e)}"
            print(line, file=sys.stderr, flush=True)
        return getattr(e, "exit_code", BAD_INPUT_EXIT)
