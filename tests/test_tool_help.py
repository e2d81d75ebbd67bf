"""Every tool in tools/ answers --help with exit code 0 and shows its options' defaults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import REPO, SUBPROCESS_ENV

pytestmark = pytest.mark.e2e

TOOLS = sorted(path.name for path in (REPO / "tools").glob("*.py"))

# Runs each script named on its command line as `python SCRIPT --help` does (as __main__, with that
# argv and the script's folder first on sys.path) and prints {script: [exit code, stdout, stderr]}.
# One Python for many tools: each tool's own process would spend seconds importing torch and
# transformers again, and their --help output is the same either way.
HELP_RUNNER = """
import contextlib, io, json, os, runpy, sys
results = {}
for script in sys.argv[1:]:
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, path = sys.argv, list(sys.path)
    sys.argv, sys.path[0] = [script, "--help"], os.path.dirname(script)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except BaseException as error:
            code = 1
            print(repr(error), file=err)
    sys.argv, sys.path[:] = argv, path
    results[script] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def test_every_tool_help_shows_its_defaults():
    assert "prepare_pairs.py" in TOOLS and len(TOOLS) >= 8
    halves = [TOOLS[::2], TOOLS[1::2]]  # two processes: the two cores CI has
    jobs = [subprocess.Popen([sys.executable, "-c", HELP_RUNNER, *(str(REPO / "tools" / tool) for tool in tools)],
                             env=SUBPROCESS_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for tools in halves]
    helps = {}
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-3000:]
        for script, (code, text, tool_err) in json.loads(out.strip().splitlines()[-1]).items():
            tool = script.rsplit("/", 1)[-1]
            assert code == 0, (tool, tool_err[-3000:])
            helps[tool] = text
    assert sorted(helps) == TOOLS
    flat = {tool: " ".join(text.split()) for tool, text in helps.items()}  # argparse wraps lines, by path length too
    for tool, text in flat.items():
        assert "(default: " in text, tool
    assert "--max-length MAX_LENGTH max prompt + response tokens (default: 1024)" in flat["prepare_pairs.py"]
    assert "(default: 512, or half of a smaller --max-length)" in flat["prepare_pairs.py"]
    assert "(default: None)" not in flat["prepare_pairs.py"]
    for tool in ("prepare_pairs.py", "score_reference.py", "sample_reference.py"):  # the tools that compute
        assert "--threads THREADS CPU threads per process" in flat[tool] and "(default: 0)" in flat[tool], tool
    for tool in ("prepare_pairs.py", "score_reference.py", "sample_reference.py", "import_dref.py", "convert_checkpoint.py",
                 "evaluate.py"):  # the tools that show progress
        assert "--no-progress show no progress" in flat[tool], tool
