"""The container's entrypoint, exercised here without a Docker engine: hadolint on the Dockerfile, and
launch/entrypoint.sh passing arguments to torchrun for training and for the tools, and finding
repository-relative paths from another working directory (the image's /workspace). The built image
itself is tested by launch/test_container.sh, which .ci/run runs after these tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, SUBPROCESS_ENV, toy_overrides
from mpo_dist.metrics_file import read_metrics

pytestmark = pytest.mark.e2e

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
    assert [record["step"] for record in read_metrics(out)] == [1, 2]
    assert (out / "checkpoints" / "step-00000002" / "checkpoint.json").is_file()


def test_entrypoint_takes_the_process_count_from_the_environment_and_the_config_from_the_repository(
        toy_inputs, tmp_path):
    # Run from a folder with no configs/ (as /workspace in the image): the repository's config is used.
    result = entrypoint("-m", "mpo_dist.train", "--config=configs/tiny_cpu.yaml",
                        *toy_overrides(toy_inputs, tmp_path / "run", **{"training.steps": 1}),
                        cwd=tmp_path, env={**ENV, "NPROC_PER_NODE": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 x cpu" in result.stdout


def test_entrypoint_prefers_the_working_directory_and_passes_the_exit_code_through(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_cpu.yaml").write_text("loss:\n  name: not-a-loss\n")  # shadows the repository's
    result = entrypoint("-m", "mpo_dist.train", "--config", "configs/tiny_cpu.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "not-a-loss" in result.stderr, result.stderr[-3000:]
    missing = entrypoint("-m", "mpo_dist.train", "--config", "configs/missing.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "config file not found: configs/missing.yaml" in missing.stderr


def test_entrypoint_help_shows_its_usage_and_torchruns_options(tmp_path):
    result = entrypoint("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "docker run" in result.stdout and "quickstart [OUTPUT_DIR]" in result.stdout
    assert "--nproc-per-node" in result.stdout and "--rdzv-endpoint" in result.stdout


def test_entrypoint_runs_a_tool_from_any_working_directory(toy_inputs, tmp_path):
    result = entrypoint("tools/prepare_pairs.py", "--input", toy_inputs["root"] / "toy" / "pairs.jsonl", "--tokenizer",
                        toy_inputs["model"], "--out", tmp_path / "pairs", "--samples-per-shard", 600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "pairs" / "manifest.json").is_file()
    failed = entrypoint("tools/convert_checkpoint.py", "--checkpoint", tmp_path, "--out", tmp_path / "hf", cwd=tmp_path)
    assert failed.returncode != 0 and "is not a training checkpoint" in failed.stderr  # exit status passes through
