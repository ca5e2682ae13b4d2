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


def screen(text: str) -> list[str]:
    """The lines a terminal shows for ``text`` (carriage return, line feed as CR LF, cursor up;
    the column kept on cursor up, as a terminal does)."""
    rows: dict[int, list[str]] = {}
    row = col = 0
    for token in re.findall(r"\x1b\[A|.|\n", text, flags=re.S):
        if token == "\x1b[A":
            row = max(row - 1, 0)
        elif token in "\r\n":
            row, col = row + (token == "\n"), 0
        else:
            line = rows.setdefault(row, [])
            line.extend(" " * (col + 1 - len(line)))
            line[col] = token
            col += 1
    return ["".join(rows.get(i, [])).rstrip() for i in range(max(rows, default=-1) + 1)]


def test_a_message_after_the_last_bar_closes_starts_at_column_0(tmp_path):
    """The demo's last 'done' line came after the second bar (position 1) closed, 65-100
    columns right: that bar left the cursor at the end of its text."""
    stream = io.StringIO()
    board = progress.Board(stream=stream, tty=True)
    first, second = board.track("run-a", tmp_path), board.track("run-b", tmp_path)
    first.poll(), second.poll()
    first.close()
    board.write("  done    run-a")
    second.close()
    board.write("  done    run-b")
    print("3 done", file=stream)
    shown = [line for line in screen(stream.getvalue()) if line.strip()]
    assert shown == ["  done    run-a", "  done    run-b", "3 done"]


def test_train_into_a_file_writes_plain_lines(synth_root, tmp_path):
    """`python -m mlcl train > log 2>&1`: no progress-bar frames ('\\r'), a line per
    train.log_every iterations instead."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "mlcl", "train", "--config", "synthetic",
           f"data.root={synth_root}", "data.crop_size=32", "train.batch_size=4",
           "model.width=16", "data.num_workers=0", "train.max_iters=4", "train.epochs=1",
           "split=1_8", "train.log_every=2", f"output_dir={tmp_path / 'run'}"]
    with open(out, "w") as fo, open(err, "w") as fe:
        assert subprocess.run(cmd, stdout=fo, stderr=fe, timeout=300).returncode == 0
    text = out.read_text() + err.read_text()
    assert "\r" not in text and "it/s" not in text
    lines = text.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("iteration ")] == \
        ["iteration 2/4", "iteration 4/4"]
    assert any(ln.startswith("epoch 1/1: loss") for ln in lines)
