"""Progress of a long tool job (prepare, score, sample, import, convert, evaluate), shown the way a
terminal user expects it and a log file can keep it.

- On a terminal: one line redrawn in place (a carriage return; a bar when the share done is known,
  done/total, rate, ETA), at most every `redraw_s` seconds. The line is ended with a newline when the
  job ends (`Progress.close`) and before anything else is written: the tools' `log` callables are
  console logs (`stderr_log`, `stdout_log`) that end it first, and so does `cli.run_main` before an
  error message or a traceback (`end_line`), so a log line never lands in a half-drawn bar.
- Elsewhere (a pipe, a log file, CI, SLURM output): plain lines through the job's `log`, at most
  every `every_s` seconds.
- Rank 0 alone shows it (`enabled`). A tool's `--no-progress` (`shown`) or MPO_DIST_PROGRESS=0 turn
  it off; MPO_DIST_PROGRESS=plain gives plain lines on a terminal, MPO_DIST_PROGRESS=1 the updating
  line where the stream is not a terminal but renders carriage returns (a notebook); TERM=dumb gets
  plain lines. No colour and no escape codes are written (a shorter redraw is padded with spaces),
  so NO_COLOR has nothing to turn off.

A `log` that is not a console log (a test's callback, the trainer's `log_main`) gets the plain lines:
a caller that silences its log silences the progress too.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

from mpo_dist.errors import InputError

SETTING = "MPO_DIST_PROGRESS"
_SETTINGS = {"0": "off", "off": "off", "false": "off", "no": "off",
             "1": "live", "on": "live", "true": "live", "yes": "live", "live": "live",
             "plain": "plain", "lines": "plain", "": "auto", "auto": "auto"}
BAR_WIDTH, MIN_BAR_WIDTH = 24, 10  # characters of the bar, at most and at least
LIVE_RATE_AFTER_S = 0.5  # the updating line shows no rate (nor ETA) measured over less: the first record's is noise

_switched_off = False  # a tool's --no-progress, for the duration of its run (`shown`)
_drawn: "Progress | None" = None  # the progress whose line is on the terminal, not yet ended


class ConsoleLog:
    """A log callable writing one line to a stream (looked up at each call, so redirections such as
    pytest's capture apply), after ending any progress line drawn on the terminal."""

    def __init__(self, stream: Callable[[], TextIO]):
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream()

    def __call__(self, message: str) -> None:
        end_line()
        stream = self.stream
        stream.write(f"{message}\n")
        stream.flush()


stderr_log = ConsoleLog(lambda: sys.stderr)  # the shard tools' log
stdout_log = ConsoleLog(lambda: sys.stdout)  # print's, for code whose lines always went to stdout


def setting() -> str:
    """MPO_DIST_PROGRESS as one of off, live, plain, auto; any other value is an input error."""
    value = os.environ.get(SETTING, "")
    if value.strip().lower() not in _SETTINGS:
        raise InputError(f"{SETTING}={value!r}: expected 0 (no progress), 1 (an updating line even where the output "
                         "is not a terminal), plain (plain lines) or auto (an updating line on a terminal)")
    return _SETTINGS[value.strip().lower()]


def display_mode(stream: TextIO | None) -> str:
    """How progress is shown on `stream` (None: a log that is not a console's): off, live (one updating
    line) or plain (a line every few seconds)."""
    chosen = setting()
    if _switched_off or chosen == "off":
        return "off"
    if stream is None or chosen == "plain":
        return "plain"
    if chosen == "live":
        return "live"
    terminal = getattr(stream, "isatty", lambda: False)()
    return "live" if terminal and os.environ.get("TERM") != "dumb" else "plain"


@contextmanager
def shown(on: bool = True) -> Iterator[None]:
    """Progress on or off (a tool's --no-progress) for the body of `cli.run_main`; a line still drawn
    is ended on the way out, so an error message or traceback starts a line of its own."""
    global _switched_off
    setting()  # a bad MPO_DIST_PROGRESS fails before any work
    previous, _switched_off = _switched_off, not on
    try:
        yield
    finally:
        end_line()
        _switched_off = previous


def end_line() -> None:
    """End the progress line on the terminal, if one is drawn, so the next output starts a line of its own."""
    global _drawn
    if _drawn is None:
        return
    drawn, _drawn = _drawn, None
    drawn._width = 0
    try:
        stream = drawn.log.stream
        stream.write("\n")
        stream.flush()
    except (OSError, ValueError):  # a closed stream at exit: the error on its way out matters more
        pass


class Progress:
    """A job's progress: `done` units (of `total`, when known), the `work` its rate is measured in
    (`work_unit`, e.g. tokens or MiB; else the rate is of `unit`), share done and ETA.

    `update` records the state and shows it when due (live: at most every `redraw_s`, the first at
    once; plain: at most every `every_s`, the first after `first_after_s`, default `every_s`; never
    for nothing done); `close` draws a live line a last time and ends it. `detail` prefixes the count
    (e.g. "rank 0 of 2, "). `clock` is injectable for tests.
    """

    def __init__(self, name: str, unit: str, log: Callable[[str], None] = stderr_log, *, total: float | None = None,
                 work_unit: str | None = None, enabled: bool = True, detail: str = "", every_s: float = 5.0,
                 redraw_s: float = 0.2, first_after_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.name, self.unit, self.log, self.total, self.work_unit, self.detail = name, unit, log, total, work_unit, detail
        self.every_s, self.redraw_s, self.clock = every_s, redraw_s, clock
        console = isinstance(log, ConsoleLog)
        self.mode = display_mode(log.stream if console else None) if enabled else "off"
        self.start = clock()
        self._printed = self.start - every_s + (every_s if first_after_s is None else first_after_s)
        self._drawn_at = -math.inf
        self._width = 0  # characters of the live line on the terminal (0: none, or ended)
        self._bar_width = BAR_WIDTH  # narrows to fit and never widens again: a bar that jumps reads badly
        self._done: float = 0
        self._work: float | None = None
        self._fraction: float | None = None
        self._updated = False

    @property
    def shown(self) -> bool:
        return self.mode != "off"

    def due(self) -> bool:
        """Whether an `update` now would be shown (cheap: for loops that compute the state only then)."""
        if self.mode == "live":
            return self.clock() - self._drawn_at >= self.redraw_s
        return self.mode == "plain" and self.clock() - self._printed >= self.every_s

    def update(self, done: float, *, work: float | None = None, fraction: float | None = None) -> None:
        """`done` units so far, `work` so far (in `work_unit`) and, where `total` does not tell it, the
        `fraction` of the job done (e.g. input bytes read)."""
        self._done, self._work, self._fraction, self._updated = done, work, fraction, True
        if not self.due():
            return
        if self.mode == "live":
            self._draw(final=False)
        elif done:
            self._printed = self.clock()
            self.log(f"{self.name}: {', '.join(self._fields(self._printed, plain=True))}")

    def close(self, done: float | None = None, *, work: float | None = None) -> None:
        """The job is done (at `done` units and `work`, when given: a loop that updates only when due
        passes its last counts): a live line is drawn a last time, with the time taken, and ended.
        Plain lines add nothing: the tool's summary follows. Later updates show nothing."""
        if done is not None:
            self._done, self._updated = done, True
        if work is not None:
            self._work = work
        if self._fraction is not None:
            self._fraction = 1.0
        if self.mode == "live" and self._updated:
            self._draw(final=True)
        self.mode = "off"

    def fraction(self) -> float | None:
        fraction = self._fraction if self._fraction is not None else self._done / self.total if self.total else None
        return None if fraction is None else min(max(fraction, 0.0), 1.0)

    def _fields(self, now: float, *, plain: bool, final: bool = False, work: bool = True, detail: bool = True) -> list[str]:
        elapsed = max(now - self.start, 1e-9)
        count = f"{_amount(self._done)}/{_amount(self.total)}" if self.total is not None else _amount(self._done)
        fields = [f"{self.detail if detail else ''}{count} {self.unit}"]
        measured, rate_unit = self._done, self.unit
        if self.work_unit is not None and self._work is not None:
            if work:
                fields.append(f"{_amount(self._work)} {self.work_unit}")
            measured, rate_unit = self._work, self.work_unit
        rated = now > self.start if plain else now - self.start >= LIVE_RATE_AFTER_S
        if rated:
            fields.append(f"{_amount(measured / elapsed)} {rate_unit}/s")
        fraction = self.fraction()
        if final:
            fields.append(f"done in {_duration(elapsed)}")
        elif fraction:
            if plain:
                fields.append(f"{fraction:.0%} done")
            if rated:
                fields.append(f"ETA {_duration(elapsed * (1 - fraction) / fraction)}")
        return fields

    def _live_text(self, now: float, final: bool, columns: int) -> str:
        """The line in at most `columns` characters (one that wraps cannot be redrawn by a carriage
        return): the bar narrows, then the work done and the detail go, then the bar; the rate and
        ETA stay to the last."""
        fraction = self.fraction()
        percent = "" if fraction is None else f" {fraction:4.0%}"
        for work, detail in ((True, True), (False, True), (False, False)):
            bare = f"{self.name}{percent} {', '.join(self._fields(now, plain=False, final=final, work=work, detail=detail))}"
            room = columns - len(bare) - 3  # " [" and "]"
            if fraction is not None and room >= MIN_BAR_WIDTH:
                width = self._bar_width = min(self._bar_width, room)
                filled = round(width * fraction)
                return f"{self.name} [{'#' * filled}{'-' * (width - filled)}]{bare[len(self.name):]}"
            if fraction is None and len(bare) <= columns:
                return bare
        return bare[:columns]

    def _draw(self, *, final: bool) -> None:
        global _drawn
        now = self._drawn_at = self.clock()
        text = self._live_text(now, final, _columns(self.log.stream) - 1)
        if _drawn is not None and _drawn is not self:
            end_line()
        stream = self.log.stream
        stream.write("\r" + text + " " * max(self._width - len(text), 0) + ("\n" if final else ""))
        stream.flush()
        self._width = 0 if final else len(text)
        _drawn = None if final else self


def _amount(value: float) -> str:
    """12,345 or 12.3 or 0.5: whole numbers with separators, small fractional ones to three figures."""
    if float(value).is_integer() or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # not a real terminal (a notebook, a test's stream)
        columns = 0
    return columns or shutil.get_terminal_size((80, 24)).columns
