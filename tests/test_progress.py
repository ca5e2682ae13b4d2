"""mlcl.study.progress: the progress.json contract, the display of running runs (bars on a
terminal, plain lines otherwise), and messages that never share a line with a bar."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time

import pytest

from mlcl import outputs
from mlcl.study import progress

# A stand-in for a training subprocess: writes progress.json like the loop does, then exits.
FAKE_RUN = """
import sys, time
from mlcl.outputs import write_progress
out, total = sys.argv[1], 6
for it in range(1, total + 1):
    miou = None if it < 3 else 40.0 + it
    write_progress(out, iteration=it, total_iters=total, epoch=it // 3, epochs=2, miou=miou,
                   best_miou=miou, elapsed_s=0.5 * it,
                   status="complete" if it == total else "running")
    time.sleep(0.15)
sys.exit(int(sys.argv[2]))
"""


def fake_run(out, rc: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FAKE_RUN, str(out), str(rc)])


def test_write_and_read_progress(tmp_path):
    assert outputs.read_progress(tmp_path) is None
    outputs.write_progress(tmp_path, iteration=30, total_iters=120, epoch=1, epochs=4,
                           miou=51.5, best_miou=52.0, elapsed_s=60.0)
    p = outputs.read_progress(tmp_path)
    assert {k: p[k] for k in ("iteration", "total_iters", "status", "miou")} == \
        {"iteration": 30, "total_iters": 120, "status": "running", "miou": 51.5}
    assert abs(p["updated"] - time.time()) < 60
    assert progress.eta_s(p) == pytest.approx(180.0)  # 90 left at 2 s each
    assert progress.describe(p) == "val mIoU 51.50 (best 52.00), ETA 3:00"
    assert progress.clock(3725) == "1:02:05" and progress.clock(None) == "?"
    assert progress.describe(None).startswith("starting")
    with pytest.raises(ValueError, match="status"):
        outputs.write_progress(tmp_path, iteration=1, total_iters=2, epoch=0, epochs=1,
                               miou=None, best_miou=None, elapsed_s=1, status="done")
    (tmp_path / outputs.PROGRESS_FILE).write_text("{half a file")
    assert outputs.read_progress(tmp_path) is None  # never a crash while polling


def test_plain_lines_when_not_a_terminal(tmp_path):
    stream = io.StringIO()
    board = progress.Board(stream=stream, tty=False, every=0)
    with board.track("synthetic-1_16-mlcl-paper-s0", tmp_path) as tracker:
        rc = progress.wait(fake_run(tmp_path), tracker.poll, interval=0.05)
    board.write("  done    synthetic-1_16-mlcl-paper-s0")
    assert rc == 0
    lines = stream.getvalue().splitlines()
    shown = [ln for ln in lines if ln.startswith("  ...     synthetic-1_16-mlcl-paper-s0: ")]
    assert len(shown) >= 2 and "\r" not in stream.getvalue()
    assert re.search(r"iteration [1-6]/6, val mIoU", shown[-1])
    assert any("ETA" in ln for ln in shown)
    assert lines[-1] == "  done    synthetic-1_16-mlcl-paper-s0"


def test_bars_on_a_terminal_and_messages_on_their_own_line(tmp_path):
    stream = io.StringIO()
    board = progress.Board(stream=stream, tty=True)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first, second = board.track("run-a", a), board.track("run-b", b)
    assert (first.position, second.position) == (0, 1)
    procs = [fake_run(a), fake_run(b, rc=3)]
    while any(p.poll() is None for p in procs):
        first.poll(), second.poll()
        board.write("ERROR: something went wrong")
        time.sleep(0.05)
    first.poll()
    assert first.bar.n == 6 and first.bar.total == 6
    second.close()
    assert board.track("run-c", b).position == 1  # the freed slot is reused
    first.close()
    assert board.track("run-d", a).position == 0
    text = stream.getvalue()
    assert "run-a" in text and "6/6 it" in text and "val mIoU 46.00" in text
    segments = re.split(r"[\r\n]|\x1b\[A", text)  # line ends, carriage returns, cursor up
    # every message is a segment of its own: never glued to a bar
    assert segments.count("ERROR: something went wrong") == text.count("ERROR")
    assert [p.returncode for p in procs] == [0, 3]


def test_wait_returns_the_exit_status_without_a_poller(tmp_path):
    assert progress.wait(fake_run(tmp_path, rc=2), None, interval=0.05) == 2
    assert json.loads((tmp_path / "progress.json").read_text())["status"] == "complete"
