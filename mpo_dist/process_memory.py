"""Peak memory of every process of a run: the launcher (torchrun's agent), each rank and its workers.

    with ProcessTreeMonitor(launcher.pid) as monitor:
        launcher.wait()
    print(describe_peaks(monitor.peaks()))

A thread polls the process tree under `root_pid` every `interval_s` and keeps, per process, the
highest VmHWM read from /proc/PID/status: the kernel's own peak resident set, so a peak between two
polls is not missed; only what a process does after its last poll before it exits is. Roles come
from the environment torchrun gives each rank: a process whose /proc/PID/environ holds RANK=N is
"rank N" unless an ancestor already is a rank, in which case it (a DataLoader worker inherits the
rank's environment) and every other descendant of a rank is "rank N worker". Linux only.

VmHWM counts file pages a process has mapped (e.g. safetensors files read through mmap), which are
page cache, not memory of its own: each process's highest RssAnon (private memory) is kept beside it.
The kernel keeps no peak of RssAnon, so that one is the highest value polled: a spike shorter than
`interval_s` can be missed.

The total adds up each process's peak RSS: an upper bound of the run's footprint (the peaks need not
coincide, and pages shared between processes, e.g. copy-on-write after fork, count once per process).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

LAUNCHER, OTHER = "launcher", "other"


@dataclass
class ProcessPeak:
    pid: int
    role: str  # "launcher", "rank N", "rank N worker" or "other"
    peak_bytes: int  # VmHWM from /proc/PID/status, the kernel's peak resident set
    anon_peak_bytes: int = 0  # the highest RssAnon polled: private memory, without mapped file pages


def read_status_bytes(pid: int, fields: tuple[str, ...]) -> dict[str, int] | None:
    """The memory `fields` (e.g. VmHWM, RssAnon) of /proc/PID/status in bytes; None when the process
    is gone or has no memory left (a zombie: its status has no such lines)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name = line.split(":", 1)[0]
                if name in fields:
                    values[name] = int(line.split()[1]) * 1024  # the kernel reports kB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return values if len(values) == len(fields) else None


def read_peak_bytes(pid: int) -> int | None:
    """VmHWM of `pid` in bytes; None when the process is gone or has no memory left (a zombie)."""
    values = read_status_bytes(pid, ("VmHWM",))
    return None if values is None else values["VmHWM"]


def read_rank(pid: int) -> int | None:
    """RANK=N from the environment `pid` started with, or None (no RANK, gone, or not ours to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            entries = environ.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for entry in entries:
        if entry.startswith(b"RANK="):
            value = entry[len(b"RANK="):]
            return int(value) if value.isdigit() else None
    return None


def _parent_and_start(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) from /proc/PID/stat; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ')': split after the last one.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[19])  # fields 4 (ppid) and 22 (starttime) of proc(5)


def process_tree(root_pid: int) -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time)} of `root_pid` and all its live descendants."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (entry := _parent_and_start(int(name))) is not None:
            table[int(name)] = entry
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    tree, pending = {}, [root_pid] if root_pid in table else []
    while pending:
        pid = pending.pop()
        tree[pid] = table[pid]
        pending.extend(children.get(pid, []))
    return tree


def assign_roles(root_pid: int, parents: dict[int, int], ranks: dict[int, int | None]) -> dict[int, str]:
    """The role of every pid of a tree, given each one's parent and the RANK of its environment.
    The topmost process with a RANK on a path is that rank; everything below it is its worker."""
    roles: dict[int, str] = {}

    def role(pid: int) -> str:
        if pid not in roles:
            parent = None if pid == root_pid else role(parents[pid])
            rank = ranks.get(pid)
            if parent is not None and parent.startswith("rank "):
                roles[pid] = parent if parent.endswith(" worker") else parent + " worker"
            elif rank is not None:
                roles[pid] = f"rank {rank}"
            else:
                roles[pid] = LAUNCHER if pid == root_pid else OTHER
        return roles[pid]

    for pid in parents:
        role(pid)
    return roles


class ProcessTreeMonitor:
    """Polls the process tree under `root_pid` in a thread, from `__enter__` to `__exit__`."""

    def __init__(self, root_pid: int, interval_s: float = 0.1):
        self.root_pid, self.interval_s = root_pid, interval_s
        # Keyed by (pid, start time): a pid reused by the system within the run is another process.
        self._peaks: dict[tuple[int, int], ProcessPeak] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ProcessTreeMonitor":
        self.poll()  # at least one reading even if the tree ends before the thread's first turn
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="process-tree-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Read the tree once: new processes are added, known ones keep their highest VmHWM and the
        latest role (a process seen between fork and exec has not got its RANK yet)."""
        tree = process_tree(self.root_pid)
        parents = {pid: parent for pid, (parent, _) in tree.items()}
        roles = assign_roles(self.root_pid, parents, {pid: read_rank(pid) for pid in tree})
        for pid, (_, start) in tree.items():
            values = read_status_bytes(pid, ("VmHWM", "RssAnon"))
            if values is None:  # exited since the tree was read: its last reading stands
                continue
            peak, anon = values["VmHWM"], values["RssAnon"]
            known = self._peaks.setdefault((pid, start), ProcessPeak(pid, roles[pid], peak, anon))
            known.role, known.peak_bytes = roles[pid], max(known.peak_bytes, peak)
            known.anon_peak_bytes = max(known.anon_peak_bytes, anon)

    def peaks(self) -> list[ProcessPeak]:
        """Every process seen in the tree with the highest VmHWM read: launcher, then each rank and its workers."""
        return sorted((ProcessPeak(p.pid, p.role, p.peak_bytes, p.anon_peak_bytes) for p in self._peaks.values()),
                      key=lambda p: (_role_order(p.role), p.pid))


def _role_order(role: str) -> tuple:
    if role == LAUNCHER:
        return (0,)
    if role.startswith("rank "):
        return (1, int(role.split()[1]), role.endswith(" worker"))
    return (2,)


def describe_peaks(peaks: list[ProcessPeak]) -> str:
    """A small table (role, pid, peak MiB) and the total of the peaks."""
    mib = 1024 * 1024
    lines = [f"{'process':<16} {'pid':>8} {'peak MiB':>9}"]
    lines += [f"{peak.role:<16} {peak.pid:>8} {peak.peak_bytes / mib:>9,.0f}" for peak in peaks]
    lines.append(f"{f'total ({len(peaks)} processes)':<25} {sum(p.peak_bytes for p in peaks) / mib:>9,.0f}")
    return "\n".join(lines)
