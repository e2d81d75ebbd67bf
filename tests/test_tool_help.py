"""Every tool in tools/ answers --help with exit code 0 and shows its options' defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import REPO, SUBPROCESS_ENV

pytestmark = pytest.mark.e2e

TOOLS = sorted(path.name for path in (REPO / "tools").glob("*.py"))


def test_every_tool_help_shows_its_defaults():
    assert "prepare_pairs.py" in TOOLS and len(TOOLS) >= 8
    jobs = {tool: subprocess.Popen([sys.executable, str(REPO / "tools" / tool), "--help"], env=SUBPROCESS_ENV, cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tool in TOOLS}
    helps = {}
    for tool, job in jobs.items():
        helps[tool], err = job.communicate(timeout=300)
        assert job.returncode == 0, (tool, err[-3000:])
    flat = {tool: " ".join(text.split()) for tool, text in helps.items()}  # argparse wraps lines, by path length too
    for tool, text in flat.items():
        assert "(default: " in text, tool
    assert "--max-length MAX_LENGTH max prompt + response tokens (default: 1024)" in flat["prepare_pairs.py"]
    assert "(default: 512, or half of a smaller --max-length)" in flat["prepare_pairs.py"]
    assert "(default: None)" not in flat["prepare_pairs.py"]
    for tool in ("prepare_pairs.py", "score_reference.py", "sample_reference.py"):  # the tools that compute
        assert "--threads THREADS CPU threads per process" in flat[tool] and "(default: 0)" in flat[tool], tool
