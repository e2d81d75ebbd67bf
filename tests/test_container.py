"""The container's entrypoint, exercised without a Docker engine: hadolint on the Dockerfile, and
launch/entrypoint.sh passing arguments to torchrun for training and for the tools (the install
script it shares with CI runs in every .ci/run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SUBPROCESS_ENV, toy_overrides

ENTRYPOINT = REPO / "launch" / "entrypoint.sh"
ENV = {**SUBPROCESS_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def entrypoint(*args, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT), *map(str, args)], cwd=cwd, env=env or ENV, capture_output=True,
                          text=True, timeout=300)


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_trains_with_arguments_passed_through(toy_inputs, tmp_path):
    out = tmp_path / "a run folder with spaces"  # arguments must survive word splitting intact
    result = entrypoint("--nproc-per-node", 2, "-m", "mpo_dist.train", "--config", "configs/tiny_cpu.yaml",
                        *toy_overrides(toy_inputs, out, **{"training.steps": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 x cpu" in result.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "checkpoints" / "step-00000002" / "checkpoint.json").is_file()


def test_entrypoint_takes_the_process_count_from_the_environment(toy_inputs, tmp_path):
    result = entrypoint("-m", "mpo_dist.train", "--config", "configs/tiny_cpu.yaml",
                        *toy_overrides(toy_inputs, tmp_path / "run", **{"training.steps": 1}),
                        env={**ENV, "NPROC_PER_NODE": "2"})
    assert result.returncode == 0 and "on 2 x cpu" in result.stdout


def test_entrypoint_runs_a_tool_from_any_working_directory(toy_inputs, tmp_path):
    result = entrypoint("tools/prepare_pairs.py", "--input", toy_inputs["root"] / "toy" / "pairs.jsonl", "--tokenizer",
                        toy_inputs["model"], "--out", tmp_path / "pairs", "--samples-per-shard", 600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "pairs" / "manifest.json").is_file()
    failed = entrypoint("tools/convert_checkpoint.py", "--checkpoint", tmp_path, "--out", tmp_path / "hf", cwd=tmp_path)
    assert failed.returncode != 0 and "is not a training checkpoint" in failed.stderr  # exit status passes through
