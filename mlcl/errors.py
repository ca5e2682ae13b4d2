"""How the command line ends on an error: one line on stderr and an exit status, no
traceback (``MLCL_DEBUG=1`` shows it for bad input).

- A run stopped on purpose or by its guard (:class:`RunStopped`, below: interrupted after a
  checkpoint, diverged, a checkpoint not written): its own line on the main process, its
  ``exit_code`` (130 Ctrl-C, 143 SIGTERM, 3 diverged, 1 otherwise).
- Bad input (:data:`BAD_INPUT`, and what the caller adds): ``error: <file or key>: <why>``,
  exit status 2.

``python -m mlcl rehearse`` ends through :func:`run_reported`; ``python -m mlcl``'s own
subcommands report the same way.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

from mlcl.config import ConfigError

# The stop exceptions live here, not in mlcl.stopping (which loads torch), so that the
# command line reports errors without loading torch.
class RunStopped(RuntimeError):
    """The run stopped before its end; the message is one line, ``exit_code`` the status;
    ``report`` is false on all processes but the main one (one line per run, not per
    process)."""

    exit_code = 1
    report = True


class RunInterrupted(RunStopped):
    """A stop signal ended the run after a checkpoint; the same command resumes it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 Ctrl-C, 143 SIGTERM


class RunDiverged(RunStopped):
    """A non-finite loss term or gradient norm; nothing after it was saved."""

    exit_code = 3


BAD_INPUT: tuple[type[BaseException], ...] = (ConfigError, OSError, ValueError)


def error_line(e: BaseException) -> str:
    """The one line shown for a bad-input error: the message (the original one for an
    error re-raised from a loader worker), or for an OS error the file and the reason."""
    from mlcl.data.splits import original_message  # mlcl.data's package loads lazily

    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = original_message(str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_reported(command: Callable[[], int | None],
                 bad_input: tuple[type[BaseException], ...] = ()) -> int:
    """``command()``'s exit status (None: 0), or for a stopped run or bad input (BAD_INPUT
    and ``bad_input``) that error's one line on stderr and its exit status (module
    docstring). Any other error propagates with its traceback: a bug, not bad input."""
    try:
        return command() or 0
    except RunStopped as e:
        if e.report:
            print(str(e) if isinstance(e, RunInterrupted) else f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BAD_INPUT + bad_input as e:
        if os.environ.get("MLCL_DEBUG"):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
