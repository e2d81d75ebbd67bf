"""Per-process peak memory of a process tree: roles from RANK in the environment, VmHWM peaks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from support import SUBPROCESS_ENV
from mpo_dist.process_memory import (ProcessPeak, ProcessTreeMonitor, assign_roles, describe_peaks, read_peak_bytes,
                                     read_rank)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads Linux /proc")

MIB = 1024 * 1024
ALLOCATED = 200 * MIB

# One script, three generations. "launcher": starts a rank (RANK=0 added to its environment);
# "rank": touches ALLOCATED bytes, starts a worker (which inherits RANK=0, like a DataLoader
# worker); every process says "ready" and then waits for EOF on the stdin they all share.
TREE = f"""
import os, subprocess, sys
role = sys.argv[1]
child = None
if role == "launcher":
    child = subprocess.Popen([sys.executable, __file__, "rank"], env={{**os.environ, "RANK": "0"}})
elif role == "rank":
    block = b"x" * {ALLOCATED}  # written, so resident
    child = subprocess.Popen([sys.executable, __file__, "worker"])
print(role, "ready", flush=True)
sys.stdin.read()
if child is not None:
    child.wait()
"""


def start_tree(tmp_path, root_env: dict) -> subprocess.Popen:
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    return subprocess.Popen([sys.executable, str(script), "launcher"], env=root_env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def wait_ready(process: subprocess.Popen, count: int = 3) -> None:
    for _ in range(count):
        assert process.stdout.readline().endswith("ready\n")


def monitored_tree(tmp_path, root_env: dict):
    """Run the process tree under a ProcessTreeMonitor: (its peaks in table order, the root's pid,
    the root's exit code)."""
    root = start_tree(tmp_path, root_env)
    try:
        with ProcessTreeMonitor(root.pid, interval_s=0.02) as monitor:
            wait_ready(root)
            time.sleep(0.1)  # a few polls with every process alive
            root.stdin.close()
            code = root.wait(timeout=30)
    finally:
        root.kill()
    return monitor.peaks(), root.pid, code


@pytest.mark.dist
def test_roles_and_the_allocating_rank_peak(tmp_path):
    in_order, root_pid, code = monitored_tree(tmp_path, SUBPROCESS_ENV)
    assert code == 0
    peaks = {peak.role: peak for peak in in_order}
    assert sorted(peaks) == ["launcher", "rank 0", "rank 0 worker"]
    assert peaks["launcher"].pid == root_pid
    assert peaks["rank 0"].peak_bytes >= ALLOCATED
    assert peaks["launcher"].peak_bytes < ALLOCATED and peaks["rank 0 worker"].peak_bytes < ALLOCATED
    assert [peak.role for peak in in_order] == ["launcher", "rank 0", "rank 0 worker"]  # table order
    # The anonymous (RssAnon) peak: the rank's written bytes are private memory; the launcher holds none of them.
    assert peaks["rank 0"].anon_peak_bytes >= ALLOCATED
    assert peaks["launcher"].anon_peak_bytes < ALLOCATED


@pytest.mark.dist
def test_a_root_with_rank_is_that_rank(tmp_path):
    in_order, _, _ = monitored_tree(tmp_path, {**SUBPROCESS_ENV, "RANK": "3"})
    # Everything below a rank is its worker, even a descendant whose own RANK differs.
    assert sorted(peak.role for peak in in_order) == ["rank 3", "rank 3 worker", "rank 3 worker"]


@pytest.mark.unit
def test_assign_roles_topmost_rank_wins():
    parents = {1: 0, 2: 1, 3: 1, 4: 2, 5: 4, 6: 1, 7: 6}
    ranks = {2: 0, 3: 1, 4: 0, 7: 5}  # 4: a DataLoader worker inheriting RANK=0; 6: no RANK
    assert assign_roles(1, parents, ranks) == {
        1: "launcher", 2: "rank 0", 3: "rank 1", 4: "rank 0 worker", 5: "rank 0 worker", 6: "other", 7: "rank 5"}


@pytest.mark.unit
def test_vanished_process_reads_as_none():
    never = 2**22 + 1  # above the largest pid_max Linux allows: never a live pid
    assert read_peak_bytes(never) is None and read_rank(never) is None
    assert read_peak_bytes(os.getpid()) > 0
    with ProcessTreeMonitor(never) as monitor:  # a root already gone: nothing seen, no error
        pass
    assert monitor.peaks() == []


@pytest.mark.unit
def test_describe_peaks_table_and_total():
    text = describe_peaks([ProcessPeak(10, "launcher", 100 * MIB), ProcessPeak(11, "rank 0", 300 * MIB)])
    lines = text.splitlines()
    assert lines[1].split() == ["launcher", "10", "100"] and lines[2].split() == ["rank", "0", "11", "300"]
    assert lines[-1].startswith("total (2 processes)") and lines[-1].endswith("400")


# A process that maps a file and reads every page of it: resident (VmHWM) but not its own memory.
MAPPER = """
import mmap, sys
with open(sys.argv[1], "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as pages:
    total = sum(pages[offset] for offset in range(0, len(pages), mmap.PAGESIZE))
    print("ready", flush=True)
    sys.stdin.read()
"""


@pytest.mark.dist
def test_mapped_file_pages_count_in_the_peak_but_not_in_the_anonymous_peak(tmp_path):
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(ALLOCATED))
    script = tmp_path / "mapper.py"
    script.write_text(MAPPER)
    mapper = subprocess.Popen([sys.executable, str(script), str(data)], env=SUBPROCESS_ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        with ProcessTreeMonitor(mapper.pid, interval_s=0.02) as monitor:
            assert mapper.stdout.readline() == "ready\n"
            time.sleep(0.1)
            mapper.stdin.close()
            assert mapper.wait(timeout=30) == 0
    finally:
        mapper.kill()
    [peak] = monitor.peaks()
    assert peak.peak_bytes >= ALLOCATED  # the kernel's peak counts the mapped pages
    assert 0 < peak.anon_peak_bytes < ALLOCATED // 4  # the interpreter's own memory only
