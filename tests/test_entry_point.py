"""`python -m mpo_dist.train` as a user meets it: one plain process without torchrun, the error
path (input errors: one line, exit 2; anything else: traceback), and the option listings."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from support import REPO, SUBPROCESS_ENV, TRAIN_CONFIG, toy_overrides
from mpo_dist.metrics_file import read_metrics

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.mark.e2e
def test_one_plain_process_trains_without_torchrun(toy_inputs, tmp_path):
    env = {key: value for key, value in SUBPROCESS_ENV.items() if key not in TORCHRUN_VARIABLES}
    result = subprocess.run([sys.executable, "-m", "mpo_dist.train", "--config", str(TRAIN_CONFIG),
                             *toy_overrides(toy_inputs, tmp_path / "run", **{"training.steps": 2})],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 1 x cpu" in result.stdout
    steps = [record["step"] for record in read_metrics(tmp_path / "run")]
    assert steps == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "checkpoint.json").is_file()


def run_in_process(toy_inputs, out, *overrides):
    from mpo_dist.train import main

    return main(["--config", str(TRAIN_CONFIG), *toy_overrides(toy_inputs, out, **{"training.steps": 1,
                                                                                  "data.num_workers": 0}), *overrides])


@pytest.mark.unit
def test_input_error_is_one_line_and_exit_2(toy_inputs, tmp_path, capfd, monkeypatch):
    for variable in TORCHRUN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    code = run_in_process(toy_inputs, tmp_path / "run", "training.global_batch_size=30")
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("mpo_dist: error: training.global_batch_size=30 is not a multiple"), err


@pytest.mark.unit
def test_unexpected_error_keeps_its_traceback_and_leaves_the_process_group(toy_inputs, tmp_path, monkeypatch):
    import torch.distributed as dist

    from mpo_dist.trainer import Trainer

    for variable in TORCHRUN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)

    def broken_train(self):
        raise ValueError("a bug deep inside the step")  # a ValueError, but not an input error

    monkeypatch.setattr(Trainer, "train", broken_train)
    with pytest.raises(ValueError, match="a bug deep inside the step"):
        run_in_process(toy_inputs, tmp_path / "run")
    assert not dist.is_initialized()


@pytest.mark.unit
def test_options_and_resolved_config_are_printed(capsys):
    from mpo_dist.train import main

    assert main(["--options"]) == 0
    table = capsys.readouterr().out
    assert "| `loss.beta` | float | `0.1` |" in table and "`checkpoint.resume`" in table
    assert main(["--config", str(TRAIN_CONFIG), "--print-config", "optim.lr=0.5", "loss.beta=0.3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["optim"]["lr"] == 0.5 and resolved["loss"]["beta"] == 0.3
    assert resolved["data"]["batch_size"] == yaml.safe_load(TRAIN_CONFIG.read_text())["data"]["batch_size"]


@pytest.mark.e2e
def test_help_points_to_the_option_listing():
    result = subprocess.run([sys.executable, "-m", "mpo_dist.train", "--help"], env=SUBPROCESS_ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--options" in result.stdout and "--print-config" in result.stdout


LATE_PEER = """
import sys, time
import mpo_dist.cli as cli
from mpo_dist.errors import InputError

cli.INPUT_ERROR_GRACE_S = 0.5

def body(info):
    if info.rank == 1:
        time.sleep(8)  # finds its error long after rank 0 stopped waiting for it
    raise InputError(f"bad input seen by rank {info.rank}")

sys.exit(cli.run_main("late-peer", body))
"""


@pytest.mark.e2e
def test_input_error_with_a_late_peer_still_exits_2(tmp_path):
    # Rank 0 gives up waiting for its peer with the barrier still pending in gloo: it must still end
    # with exit code 2 (not a SIGABRT from interpreter shutdown, which made the launcher exit 1).
    script = tmp_path / "late_peer.py"
    script.write_text(LATE_PEER)
    result = subprocess.run([sys.executable, "-m", "mpo_dist.launcher", "--standalone", "--nproc-per-node", "2",
                             str(script)], env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "late-peer: error (rank 0): bad input seen by rank 0" in result.stderr
    assert "Signal 6" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.unit
def test_more_processes_than_gpus_is_an_input_error_naming_the_fix():
    from mpo_dist.distributed import check_local_gpu
    from mpo_dist.errors import InputError

    check_local_gpu(0, 1, 1, "0")  # one process per GPU: nothing to say
    check_local_gpu(1, 2, 2, None)
    with pytest.raises(InputError) as raised:
        check_local_gpu(1, 2, 1, "0")
    assert str(raised.value) == ("LOCAL_RANK 1 has no GPU: this node sees 1 CUDA device (CUDA_VISIBLE_DEVICES=0), but "
                                 "torchrun started 2 processes on it; use --nproc-per-node 1 (NCCL cannot put two ranks "
                                 "on one GPU)")
    with pytest.raises(InputError, match=r"sees 2 CUDA devices \(CUDA_VISIBLE_DEVICES=unset\).* started 4 processes"
                                         r".*--nproc-per-node 2"):
        check_local_gpu(3, 4, 2, None)


@pytest.mark.unit
def test_a_rank_without_a_gpu_stops_in_one_line_with_exit_code_2(monkeypatch, capfd):
    # The check runs in init_distributed, before run_main's try around the body: still one line and code 2.
    import torch
    import torch.distributed as dist

    from mpo_dist import cli

    for variable in TORCHRUN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ran = []
    assert cli.run_main("gpu-check", ran.append) == 2
    assert ran == [] and not dist.is_initialized()
    assert capfd.readouterr().err.splitlines() == [
        "gpu-check: error: LOCAL_RANK 1 has no GPU: this node sees 1 CUDA device (CUDA_VISIBLE_DEVICES=0), but torchrun "
        "started 2 processes on it; use --nproc-per-node 1 (NCCL cannot put two ranks on one GPU)"]


@pytest.mark.unit
def test_the_trainer_uses_the_entry_points_process_group_and_never_makes_one(monkeypatch):
    """The process group is set up in one place (`cli.run_main` through `init_distributed`): the Trainer's
    `rank_info_of_group` refuses to run without one instead of creating a second, and reads the group's
    rank and size (node-local facts from torchrun's environment)."""
    import torch.distributed as dist

    from mpo_dist.cli import run_main
    from mpo_dist.distributed import RankInfo, rank_info_of_group

    for variable in TORCHRUN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(RuntimeError, match="no process group: run under cli.run_main"):
        rank_info_of_group()
    seen = []
    assert run_main("test", lambda info: seen.append((info, rank_info_of_group(), dist.get_world_size())),
                    single_process_group=True) == 0
    assert seen == [(RankInfo(0, 1, 0, 1), RankInfo(0, 1, 0, 1), 1)]
    assert not dist.is_initialized()  # run_main left the group it made
