"""nemo_aot.progress: rank-0 progress lines on a fake clock, and the console logging set-up."""

import logging
import os
import subprocess
import sys

import pytest

from nemo_aot.progress import (
    Progress,
    RankZeroFilter,
    configure_logging,
    current_rank,
    format_duration,
    format_rate,
    log_level,
    track,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeClock:
    def __init__(self):
        self.now, self.calls = 1000.0, 0

    def __call__(self):
        self.calls += 1
        return self.now


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="nemo_aot.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "nemo_aot.progress"]


def test_line_has_done_total_percent_rate_and_eta(lines):
    clock = FakeClock()
    p = Progress(5000, "reference scoring", "global batches", clock=clock, rank=0)
    clock.now += 387.0
    p.update(1200)  # 1200 / 387 s = 3.1/s; 3800 left -> 1225.8 s
    assert lines() == ["reference scoring: 1200/5000 global batches (24%), 3.1/s, ETA 20m 25s"]


def test_lines_are_throttled_to_the_interval(lines):
    clock = FakeClock()
    p = Progress(100, "tokenizing train split", "records", interval=30, clock=clock, rank=0)
    for _ in range(10):  # 10 updates over 25 s: nothing yet
        clock.now += 2.5
        p.update()
    assert lines() == []
    clock.now += 5.0  # 30 s since the start
    p.update()
    clock.now += 29.5  # 29.5 s since that line
    p.update()
    assert len(lines()) == 1
    clock.now += 0.5
    p.update()
    assert [line.split(":")[1].split()[0] for line in lines()] == ["11/100", "13/100"]


def test_final_line_after_a_long_phase_and_silence_for_a_short_one(lines):
    clock = FakeClock()
    with Progress(10, "short", "records", interval=30, clock=clock, rank=0) as p:
        clock.now += 29.0
        p.update(10)
    assert lines() == []
    with Progress(64, "reference scoring", "global batches", interval=30, clock=clock,
                  rank=0) as p:
        for _ in range(64):
            clock.now += 2.0
            p.update()
    got = lines()
    assert len(got) == 5  # at 30, 60, 90, 120 s (4 lines) + the final one
    assert got[-1] == "reference scoring: done, 64/64 global batches in 2m 08s, 30.0/min"
    p.close()  # idempotent
    assert len(lines()) == 5


def test_other_ranks_are_silent_and_never_read_the_clock(lines):
    clock = FakeClock()
    p = Progress(10, "scoring", "batches", interval=1, clock=clock, rank=3)
    for _ in range(10):
        clock.now += 5
        p.update()
    p.close()
    assert lines() == [] and clock.calls == 0 and p.done == 10


def test_unknown_total_and_unknown_eta(lines):
    clock = FakeClock()
    p = Progress(None, "reading", "rows", interval=10, clock=clock, rank=0)
    clock.now += 10
    p.update(250)
    q = Progress(8, "scoring", "batches", interval=10, clock=clock, rank=0)
    clock.now += 10
    q.update(0)
    assert lines() == ["reading: 250 rows, 25.0/s", "scoring: 0/8 batches (0%), 0.0/h, ETA unknown"]


def test_track_counts_items_and_closes_on_break(lines):
    clock = FakeClock()
    seen = []
    for item in track(range(100), what="scoring", unit="batches", interval=5, clock=clock, rank=0):
        clock.now += 1
        seen.append(item)
        if item == 49:
            break  # an item counts once the loop asks for the next: 49 done
    assert seen == list(range(50))
    got = lines()
    assert got[0] == "scoring: 5/100 batches (5%), 1.0/s, ETA 1m 35s"  # total from len()
    assert got[-1] == "scoring: done, 49/100 batches in 50s, 58.8/min"


def test_formats():
    seconds = (0, 59.9, 61, 3599, 3600 * 3 + 7 * 60, 86400 * 2 + 4 * 3600)
    assert [format_duration(s) for s in seconds] == ["0s", "59s", "1m 01s", "59m 59s", "3h 07m",
                                                     "2d 04h"]
    assert [format_rate(r) for r in (3.14, 250.0, 0.0812, 1 / 300, 0.0)] \
        == ["3.1/s", "250/s", "4.9/min", "12.0/h", "0.0/h"]
    with pytest.raises(ValueError, match="total"):
        Progress(-1, "x")


def test_rank_from_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    assert current_rank() == 2
    record = logging.LogRecord("nemo_aot.x", logging.INFO, __file__, 1, "m", None, None)
    warning = logging.LogRecord("nemo_aot.x", logging.WARNING, __file__, 1, "m", None, None)
    assert not RankZeroFilter().filter(record) and RankZeroFilter().filter(warning)
    assert Progress(3, "x").active is False
    monkeypatch.setenv("RANK", "0")
    assert RankZeroFilter().filter(record) and Progress(3, "x").active is True


def test_log_level_from_the_variable():
    assert log_level({}) == logging.INFO
    assert log_level({"NEMO_AOT_LOG_LEVEL": ""}) == logging.INFO
    assert log_level({"NEMO_AOT_LOG_LEVEL": "warning"}) == logging.WARNING
    assert log_level({"NEMO_AOT_LOG_LEVEL": "DEBUG"}) == logging.DEBUG
    assert log_level({"NEMO_AOT_LOG_LEVEL": "15"}) == 15
    with pytest.raises(ValueError, match=r"NEMO_AOT_LOG_LEVEL='loud' is not a log level"):
        log_level({"NEMO_AOT_LOG_LEVEL": "loud"})


SCRIPT = """
import logging, sys
from nemo_aot.progress import configure_logging
configure_logging()
logging.getLogger("nemo_aot.data.dataset").info("ours-info")
logging.getLogger("nemo_aot.data.dataset").debug("ours-debug")
logging.getLogger("megatron.core.x").info("theirs-info")
logging.getLogger("megatron.core.x").warning("theirs-warning")
logging.getLogger("nemo_aot.x").warning("ours-warning")
"""


@pytest.mark.parametrize("env, shown", [
    ({}, {"ours-info", "theirs-warning", "ours-warning"}),
    ({"NEMO_AOT_LOG_LEVEL": "DEBUG"},
     {"ours-info", "ours-debug", "theirs-warning", "ours-warning"}),
    ({"NEMO_AOT_LOG_LEVEL": "WARNING"}, {"theirs-warning", "ours-warning"}),
    ({"NEMO_AOT_LOG_LEVEL": "ERROR"}, set()),
    ({"RANK": "1"}, {"theirs-warning", "ours-warning"}),
    ({"RANK": "0"}, {"ours-info", "theirs-warning", "ours-warning"}),
])
def test_configure_logging_levels_and_ranks(env, shown):
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "NEMO_AOT_LOG_LEVEL")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    words = {w for w in proc.stderr.split() if w.startswith(("ours-", "theirs-"))}
    assert words == shown


def test_bad_level_is_refused_by_the_cli_naming_the_variable():
    proc = subprocess.run([sys.executable, "-m", "nemo_aot.cli", "--version"], cwd=ROOT,
                          env={**os.environ, "NEMO_AOT_LOG_LEVEL": "verbose"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "NEMO_AOT_LOG_LEVEL='verbose' is not a log level" in proc.stderr


def test_configure_logging_leaves_the_logger_tree_as_documented():
    root, ours = logging.getLogger(), logging.getLogger("nemo_aot")
    saved = root.level, ours.level, list(root.handlers), [list(h.filters) for h in root.handlers]
    try:
        assert configure_logging({"NEMO_AOT_LOG_LEVEL": "info"}) == logging.INFO
        assert ours.level == logging.INFO and root.level == logging.WARNING
        assert all(any(isinstance(f, RankZeroFilter) for f in h.filters) for h in root.handlers)
    finally:
        root.setLevel(saved[0])
        ours.setLevel(saved[1])
        for h in list(root.handlers):
            if h not in saved[2]:
                root.removeHandler(h)
        for h, filters in zip(saved[2], saved[3]):
            h.filters[:] = filters
