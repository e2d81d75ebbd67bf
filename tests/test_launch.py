"""The launch scripts and shipped configs: configs load, manifests parse, scripts are valid bash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mpo_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + [REPO / "launch" / "slurm.sbatch"]


@pytest.mark.unit
def test_configs_found():
    assert {"tiny_cpu.yaml", "llama-1b.yaml", "llama-8b.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.unit
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    load_config(str(path))


@pytest.mark.e2e
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax(path):
    assert path.exists(), path
    subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.e2e
def test_multi_node_requires_rdzv_endpoint(tmp_path):
    # A fake python on PATH records any call: the script must refuse before reaching the launcher.
    marker = tmp_path / "launcher_called"
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "NNODES": "2", "NPROC_PER_NODE": "1"}
    result = subprocess.run(["bash", str(REPO / "launch" / "multi_node.sh"), "configs/tiny_cpu.yaml"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "RDZV_ENDPOINT" in result.stderr
    assert not marker.exists()


@pytest.mark.e2e
def test_multi_node_command(tmp_path):
    # With the variables set, the script execs the launcher (torchrun) with the c10d rendezvous flags and overrides.
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "NNODES": "2", "NPROC_PER_NODE": "1",
           "RDZV_ENDPOINT": "localhost:29500", "JOB_ID": "t1"}
    result = subprocess.run(["bash", str(REPO / "launch" / "multi_node.sh"), "configs/tiny_cpu.yaml",
                             "training.steps=3"], env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    args = " ".join(result.stdout.split("\n"))
    assert args.startswith("-m mpo_dist.launcher ")
    for expected in ("--nnodes 2", "--nproc-per-node 1", "--rdzv-backend c10d", "--rdzv-endpoint localhost:29500",
                     "--rdzv-id t1", "--max-restarts 3", "--rdzv-conf join_timeout=600",
                     "-m mpo_dist.train --config configs/tiny_cpu.yaml training.steps=3"):
        assert expected in args, (expected, args)
