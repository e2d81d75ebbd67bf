"""The container's install path and entrypoint, exercised without a Docker engine: launch/install.sh
(also run by .ci/run), hadolint on the Dockerfile, and launch/entrypoint.sh passing arguments to
torchrun for training and for the tools."""

from __future__ import annotations

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


def test_dockerfile_uses_the_install_script_and_the_entrypoint():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "RUN bash launch/install.sh" in dockerfile
    assert 'ENTRYPOINT ["/opt/mpo_dist/launch/entrypoint.sh"]' in dockerfile
    assert "ARG BASE_IMAGE=" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    assert "\nUSER " in dockerfile and "USER root" not in dockerfile
    readme_tests = (REPO / "README.md").read_text().split("```bash\n")[2].split("\n```")[0]
    assert "launch/install.sh" in readme_tests and readme_tests in (REPO / ".ci" / "run").read_text()


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
    assert "on 2 x cpu" in result.stdout and "step 2/2" in result.stdout
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
