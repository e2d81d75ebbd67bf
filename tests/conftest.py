"""Hooks of the test suite: the helpers and fixtures registered as plugins, the three test classes
(unit, dist, e2e: docs/testing.md) required of every test, and the unit class held to one process.
Helpers live in support.py and prepare_support.py: tests import them from there, never from here."""

from __future__ import annotations

import multiprocessing.process
import os
import platform
import subprocess
import traceback
from pathlib import Path

import pytest

pytest.register_assert_rewrite("support", "prepare_support")  # before they are imported, here or as plugins
from support import REPO  # noqa: E402

# The tests run tiny models in this process: one intra-op thread is fastest, and on a busy machine idle
# OpenMP threads spinning make them several times slower. Set before torch is first imported (the
# subprocesses the tests start get the same through support.SUBPROCESS_ENV); an explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["support", "prepare_support"]

TEST_CLASSES = ("unit", "dist", "e2e")


def pytest_configure(config):
    """In-process tests are spared the warnings the entry points silence (none is set at import time)."""
    from mpo_dist.cli import quiet_known_warnings

    quiet_known_warnings()
    platform.processor()  # runs `uname -p` once and caches it: unit tests that read it start no process


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test is checked, whatever runs
def pytest_collection_modifyitems(config, items):
    """Collection fails unless every test carries exactly one of the classes, so `pytest -m unit` and
    `pytest -m "not e2e"` can never leave a test out silently."""
    wrong = []
    for item in items:
        classes = sorted({mark.name for mark in item.iter_markers() if mark.name in TEST_CLASSES})
        if len(classes) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(classes) or 'none'}")
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} test(s) without exactly one of the markers {', '.join(TEST_CLASSES)} "
            "(a module's `pytestmark = pytest.mark.unit`, or a mark on each test where a file mixes them; "
            "see docs/testing.md):\n" + "\n".join(wrong[:40]) + ("\n  ..." if len(wrong) > 40 else ""))


@pytest.fixture(autouse=True)
def unit_tests_stay_in_one_process(request, monkeypatch):
    """A unit test that starts a process (a subprocess, a DataLoader worker, mp.spawn) fails: the unit
    class is what `pytest -m unit` promises to keep fast. pytest.fail raises a BaseException, so code
    under test that catches Exception cannot hide the attempt."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(*args, **kwargs):
        ours = [frame for frame in traceback.extract_stack()[:-1]
                if frame.filename.startswith(str(REPO)) and "site-packages" not in frame.filename]
        where = f" at {Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno}" if ours else ""
        pytest.fail(f"{request.node.nodeid} is marked unit (one process) but started a process{where}; mark it dist "
                    "(it starts Python processes itself: mp.spawn, DataLoader workers, a helper script) or e2e "
                    "(it runs a command: torchrun, a tool, the trainer, a launch script): see docs/testing.md",
                    pytrace=False)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
