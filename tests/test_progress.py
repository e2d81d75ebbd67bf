"""mpo_dist/progress.py: plain lines at most every N seconds where the output is not a terminal, one
updating line on a terminal that a log line ends first, the off switches, and rank 0 alone."""

from __future__ import annotations

import io
import re
import signal

import pytest

from mpo_dist import progress as progress_module
from mpo_dist.cli import run_main
from mpo_dist.data.shards import ShardInfo
from mpo_dist.errors import InputError
from mpo_dist.producers.job import run_shard_job
from mpo_dist.progress import SETTING, ConsoleLog, Progress, shown

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A stream that says it is a terminal (and has no file descriptor, like a notebook's)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def auto_setting(monkeypatch):
    """The automatic choice, an 80-column fallback width, and the signal handlers run_main installs undone."""
    monkeypatch.delenv(SETTING, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "80")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    progress_module.end_line()  # a failed test leaves no line registered for the next one


def shard_progress(stream, clock, **options) -> Progress:
    return Progress("job", "shards", ConsoleLog(lambda: stream), total=10, work_unit="tokens", clock=clock, **options)


def test_not_a_terminal_gives_plain_lines_with_rate_and_eta_at_most_every_few_seconds():
    stream, clock = io.StringIO(), Clock()
    progress = shard_progress(stream, clock, every_s=5.0, first_after_s=0.0)
    assert progress.mode == "plain"
    for now, done in ((101.0, 1), (103.0, 2), (105.9, 3), (106.5, 4), (111.0, 5), (111.5, 6)):
        clock.now = now
        progress.update(done, work=100 * done)
    progress.close()
    assert stream.getvalue() == (
        "job: 1/10 shards, 100 tokens, 100 tokens/s, 10% done, ETA 9s\n"  # at once (first_after_s=0)
        "job: 4/10 shards, 400 tokens, 61.5 tokens/s, 40% done, ETA 10s\n"  # 5.5 s later: 2 and 3 not shown
        "job: 6/10 shards, 600 tokens, 52.2 tokens/s, 60% done, ETA 8s\n")  # 5 s after that; close adds nothing


def test_plain_lines_wait_for_the_first_interval_and_take_the_fraction_given():
    lines, clock = [], Clock()
    progress = Progress("prepare_pairs", "records", lines.append, every_s=5.0, clock=clock)
    clock.now = 104.0
    progress.update(50, fraction=0.1)  # before the first 5 s: nothing
    clock.now = 105.0
    progress.update(2000, fraction=0.25)
    clock.now = 200.0
    progress.update(0)  # nothing done: no news
    assert lines == ["prepare_pairs: 2,000 records, 400 records/s, 25% done, ETA 15s"]


def test_a_terminal_gets_one_updating_line_that_a_log_line_ends_first(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    stream, clock = Terminal(), Clock()
    log = ConsoleLog(lambda: stream)
    progress = Progress("job", "shards", log, total=4, work_unit="tokens", clock=clock, redraw_s=0.25)
    assert progress.mode == "live"
    clock.now = 101.0
    progress.update(1, work=1000)  # the first update is drawn at once
    clock.now = 101.1
    progress.update(2, work=2000)  # within redraw_s: not drawn
    clock.now = 102.0
    progress.update(2, work=2000)
    clock.now = 103.0
    progress.update(3, work=2250)
    log("job: a message")
    clock.now = 108.0
    progress.close(4, work=4000)
    first = "job [######------------------]  25% 1/4 shards, 1,000 tokens, 1,000 tokens/s, ETA 3s"
    second = "job [############------------]  50% 2/4 shards, 2,000 tokens, 1,000 tokens/s, ETA 2s"
    third = "job [##################------]  75% 3/4 shards, 2,250 tokens, 750 tokens/s, ETA 1s"
    final = "job [########################] 100% 4/4 shards, 4,000 tokens, 500 tokens/s, done in 8s"
    assert len(second) - len(third) == 2
    assert stream.getvalue() == (f"\r{first}\r{second}\r{third}  \n"  # redrawn in place, a shorter one padded;
                                 "job: a message\n"  # the log line ended it first
                                 f"\r{final}\n")  # the last one drawn on a line of its own, and ended


@pytest.mark.parametrize("columns, line", [
    (120, "score_reference [#######-----------------]  30% rank 0 of 8, 3/10 shards, 1,234,567 tokens, 123,457 tokens/s, "
          "ETA 23s"),
    (80, "score_reference [#####------------]  30% 3/10 shards, 123,457 tokens/s, ETA 23s"),  # 79 characters
    (40, "score_reference  30% 3/10 shards, 123,4"),
])
def test_the_line_fits_the_terminal_and_has_no_escape_codes(columns, line, monkeypatch):
    """A line that wraps cannot be redrawn: the bar narrows, the work and the detail go, the rest is cut."""
    monkeypatch.setenv("COLUMNS", str(columns))
    stream, clock = Terminal(), Clock()
    progress = Progress("score_reference", "shards", ConsoleLog(lambda: stream), total=10, work_unit="tokens",
                        detail="rank 0 of 8, ", clock=clock)
    clock.now = 110.0
    progress.update(3, work=1_234_567)
    assert stream.getvalue() == f"\r{line}" and len(line) < columns
    assert "\x1b" not in stream.getvalue()


def test_an_error_in_a_tool_ends_the_line_before_its_message(capfd):
    stream, clock = Terminal(), Clock()

    def body(info):
        progress = Progress("job", "shards", ConsoleLog(lambda: stream), total=3, clock=clock)
        clock.now = 110.0
        progress.update(1)
        raise InputError("--input x.jsonl: record 7 is not JSON")

    assert run_main("job", body) == 2
    assert stream.getvalue().startswith("\rjob [") and stream.getvalue().endswith("1/3 shards, 0.1 shards/s, ETA 20s\n")
    assert capfd.readouterr().err == "job: error: --input x.jsonl: record 7 is not JSON\n"


def test_off_switches_and_forced_modes(monkeypatch):
    def output(stream, **options) -> str:
        clock = Clock()
        progress = Progress("job", "shards", ConsoleLog(lambda: stream), total=2, clock=clock, first_after_s=0.0, **options)
        clock.now = 101.0
        progress.update(1)
        progress.close(2)
        return stream.getvalue()

    live, plain = "\rjob [############------------]  50% 1/2 shards", "job: 1/2 shards, 1 shards/s, 50% done, ETA 1s\n"
    assert output(Terminal()).startswith(live)
    assert output(io.StringIO()) == plain
    assert output(Terminal(), enabled=False) == ""  # ranks other than 0
    assert output(io.StringIO(), enabled=False) == ""
    with shown(False):  # a tool's --no-progress
        assert output(Terminal()) == "" and output(io.StringIO()) == ""
    assert output(Terminal()).startswith(live)  # switched back on after the tool's run
    monkeypatch.setenv(SETTING, "0")
    assert output(Terminal()) == "" and output(io.StringIO()) == ""
    monkeypatch.setenv(SETTING, "plain")
    assert output(Terminal()) == plain
    monkeypatch.setenv(SETTING, "1")  # an updating line where the stream is no terminal (a notebook)
    assert output(io.StringIO()).startswith(live)
    lines, clock = [], Clock()  # but never through a log that is not a console's: a silenced log stays silent
    through_a_callback = Progress("job", "shards", lines.append, total=2, first_after_s=0.0, clock=clock)
    clock.now = 101.0
    through_a_callback.update(1)
    assert lines == [plain.rstrip("\n")]
    monkeypatch.setenv(SETTING, "auto")
    monkeypatch.setenv("TERM", "dumb")
    assert output(Terminal()) == plain
    monkeypatch.setenv(SETTING, "sometimes")
    with pytest.raises(InputError, match="MPO_DIST_PROGRESS='sometimes': expected 0"):
        output(Terminal())


def test_no_progress_in_run_main_and_a_bad_setting_is_a_one_line_error(monkeypatch, capfd):
    stream = Terminal()

    def body(info):
        Progress("job", "shards", ConsoleLog(lambda: stream), total=2).update(1)

    assert run_main("job", body, progress=False) == 0 and stream.getvalue() == ""
    monkeypatch.setenv(SETTING, "maybe")
    assert run_main("job", body) == 2 and stream.getvalue() == ""
    assert capfd.readouterr().err.startswith("job: error: MPO_DIST_PROGRESS='maybe': expected 0")


@pytest.mark.parametrize("rank, stream", [(0, Terminal), (0, io.StringIO), (1, Terminal)])
def test_shard_jobs_show_rank_0s_share_by_samples(rank, stream, tmp_path, monkeypatch):
    """rank 0 of 2 makes shards 0 and 2 (10 and 30 samples), rank 1 shard 1 (the others' files stand in
    for the peer's): on a terminal an updating line from 0/2 shards, through a pipe a line at the first
    shard with the share done counted in samples (10 of 40); rank 1 shows nothing."""
    monkeypatch.setenv("COLUMNS", "200")
    shards = [ShardInfo(f"shard-{index:05d}.bin", 10 * (index + 1)) for index in range(3)]
    out = tmp_path / "out"
    out.mkdir()
    (out / ".job.json").write_text("{}")
    for index, shard in enumerate(shards):
        if index % 2 != rank:
            (out / shard.name).write_bytes(b"peer")

    def make(index: int, shard: ShardInfo) -> int:
        (out / shard.name).write_bytes(b"mine")
        return shard.num_samples * 4

    stream = stream()
    totals = run_shard_job("score_reference", shards, out, make, rank=rank, world_size=2,
                           log=ConsoleLog(lambda: stream), params={})
    assert totals["made"] == (2 if rank == 0 else 1) and totals["work"] == (160 if rank == 0 else 80)
    if rank:
        assert stream.getvalue() == ""
    elif stream.isatty():
        drawn = stream.getvalue().split("\r")[1:]
        assert drawn[0].rstrip() == "score_reference [------------------------]   0% rank 0 of 2, 0/2 shards, 0 tokens"
        assert drawn[-1].startswith("score_reference [########################] 100% rank 0 of 2, 2/2 shards, 160 tokens")
        assert " done in " in drawn[-1] and drawn[-1].endswith("\n") and stream.getvalue().count("\n") == 1
    else:
        assert re.fullmatch(r"score_reference: rank 0 of 2, 1/2 shards, 40 tokens, [\d,.]+ tokens/s, 25% done, ETA \d+s\n",
                            stream.getvalue()), stream.getvalue()
