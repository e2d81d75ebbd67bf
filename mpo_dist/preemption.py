"""Preemption: a scheduler's signal ends training at a step boundary, with a checkpoint of that step.

SLURM (preemption, `scancel`, `--signal=USR1@SECONDS` ahead of a time limit), Kubernetes (pod
eviction) and spot reclaims send SIGTERM, then SIGKILL after a grace period. torchrun forwards the
signal to every rank at once (`--signals-to-handle`) and waits `--shutdown-timeout` seconds for
them. While the training loop runs, `Preemption` only records the signal (a handler that does no
work, so the step in progress is not interrupted); the ranks agree on it at the end of the step in
the finite guard's all-reduce (no extra host sync), save a checkpoint of that step, and leave
through the usual SIGTERM path (`errors.Terminated`: cleanup, exit code 143). Outside the loop (the
pre-flight, building the model) a signal stops the run at once, before step 1, as before.
"""

from __future__ import annotations

import signal
from typing import Sequence

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
# What torchrun forwards through mpo_dist.launcher (its --signals-to-handle): only these reach the ranks.
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
# A signal a process cannot catch, or that the DataLoader needs for itself, cannot ask for preemption.
_UNUSABLE = {"SIGKILL", "SIGSTOP", "SIGCHLD"}


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    """Signal names (SIGTERM, USR1, ...) as signals; ValueError naming an unknown one, or one that
    cannot serve (uncatchable, the DataLoader's SIGCHLD, or not forwarded to the ranks by the launcher)."""
    out = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if full not in signal.Signals.__members__:
            raise ValueError(f"{name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
        if full in _UNUSABLE or full not in FORWARDED_SIGNALS:
            raise ValueError(f"{name!r} cannot ask for preemption: use some of {', '.join(FORWARDED_SIGNALS)} "
                             "(the signals mpo_dist.launcher has torchrun forward to the ranks)")
        out.append(signal.Signals[full])
    return out


def ignore_in_data_workers(worker_id: int) -> None:
    """A DataLoader worker's init: torchrun and SLURM signal every process of a rank (its process group,
    or the whole job step), and a worker that died of SIGTERM would fail the step in progress before
    the rank could save it. The worker ends with its rank instead (the loader shuts it down)."""
    for name in FORWARDED_SIGNALS:
        signal.signal(signal.Signals[name], signal.SIG_IGN)


class Preemption:
    """A context manager: inside it, `signals` are recorded instead of acted on (`requested`)."""

    def __init__(self, signals: Sequence[str] = DEFAULT_SIGNALS):
        self.signals = parse_signals(signals)
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "Preemption":
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
