"""job.output_dir belongs to one run: a checkpoint of another model is a mismatch (named), not damage;
starting fresh over an earlier run's checkpoints needs job.overwrite_output_dir; a run refused before
step 1, or stopped by SIGTERM, leaves no run lock and no folder it created."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import REPO, SUBPROCESS_ENV, TRAIN_CONFIG, toy_overrides, torchrun_command, train
from mpo_dist.metrics_file import read_metrics
from mpo_dist.run_lock import LOCK_NAME

FLOAT32 = {"model.dtype": "float32", "metrics.tensorboard": "false"}


def wider_model(toy_model: Path, out: Path) -> Path:
    """The toy model's tokenizer with a wider random-init Llama (hidden_size 96 instead of 64)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(toy_model))
    config.hidden_size, config.intermediate_size = 96, 256
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    for path in toy_model.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(path, out / path.name)
    return out


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("mpo_dist: error")]


@pytest.mark.e2e
def test_another_models_checkpoints_are_named_as_such_and_never_overwritten_unless_asked(toy_inputs, tmp_path):
    run = tmp_path / "run"
    train(*toy_overrides(toy_inputs, run, **FLOAT32, **{"training.steps": 2}), nproc=1)
    earlier = snapshot(run)
    assert "checkpoints/step-00000002/checkpoint.json" in earlier and "metrics.jsonl" in earlier
    wide = wider_model(toy_inputs["model"], tmp_path / "wide")

    # resume=auto: the wider model's run names what does not match; it is not called damage.
    auto = train(*toy_overrides(toy_inputs, run, **FLOAT32, **{"model.path": wide}), nproc=1, check=False)
    assert auto.returncode == 2, auto.stderr[-3000:]
    (line,) = error_lines(auto)
    assert "holds another model than this run's (it is not damaged)" in line
    assert "model.embed_tokens.weight is [16, 64] there and [16, 96] in this run" in line
    assert "hidden_size 64 (this run's: 96)" in line and "job.overwrite_output_dir=true" in line
    assert "damaged (" not in auto.stdout + auto.stderr
    assert snapshot(run) == earlier

    # resume=none (what the damaged-checkpoint message used to advise): refused, naming the option.
    fresh = train(*toy_overrides(toy_inputs, run, **FLOAT32, **{"model.path": wide, "checkpoint.resume": "none"}),
                  nproc=1, check=False)
    assert fresh.returncode == 2, fresh.stderr[-3000:]
    (line,) = error_lines(fresh)
    assert "checkpoint.resume=none" in line and "step-00000002" in line and "job.overwrite_output_dir=true" in line
    assert snapshot(run) == earlier

    # Asked for explicitly: the earlier run's files go, and the new run's are all that is there.
    overwrite = {"model.path": wide, "checkpoint.resume": "none", "job.overwrite_output_dir": "true", "training.steps": 1}
    replaced = train(*toy_overrides(toy_inputs, run, **FLOAT32, **overwrite), nproc=1)
    assert "deleted the earlier run's checkpoints, metrics.jsonl" in replaced.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
    assert json.loads((run / "checkpoints" / "step-00000001" / "hf" / "config.json").read_text())["hidden_size"] == 96
    assert [record["step"] for record in read_metrics(run)] == [1]
    assert f"path: {wide}" in (run / "config.yaml").read_text()


@pytest.mark.unit
@pytest.mark.parametrize("resume", ["auto", "outputs/run/checkpoints/step-00000010"])
def test_overwrite_needs_resume_none(resume):
    """It deletes job.output_dir's checkpoints: never the one a run resumes from."""
    from mpo_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"job.overwrite_output_dir=true deletes job.output_dir's checkpoints, which "
                                          rf"checkpoint.resume={resume} would resume from .*set checkpoint.resume=none"):
        load_config(str(TRAIN_CONFIG), ["job.overwrite_output_dir=true", f"checkpoint.resume={resume}"])
    assert load_config(str(TRAIN_CONFIG), ["job.overwrite_output_dir=true", "checkpoint.resume=none"]).job.overwrite_output_dir


@pytest.mark.e2e
def test_overwrite_removes_a_linked_checkpoints_folder_without_following_it(toy_inputs, tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "scratch"
    train(*toy_overrides(toy_inputs, elsewhere, **FLOAT32, **{"training.steps": 1}), nproc=1)
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere / "checkpoints", target_is_directory=True)
    kept = snapshot(elsewhere)
    overwrite = {"checkpoint.resume": "none", "job.overwrite_output_dir": "true", "training.steps": 1}
    train(*toy_overrides(toy_inputs, run, **FLOAT32, **overwrite), nproc=1)
    assert snapshot(elsewhere) == kept  # the link's target is another folder's business
    assert not (run / "checkpoints").is_symlink() and (run / "checkpoints" / "step-00000001").is_dir()


@pytest.mark.e2e
def test_a_run_refused_on_every_rank_leaves_no_lock_and_no_folder_it_made(toy_inputs, tmp_path):
    # 2 ranks x 16 pairs do not divide 40: an input error found after the run lock was taken.
    new = tmp_path / "new" / "run"
    refused = train(*toy_overrides(toy_inputs, new, **FLOAT32, **{"training.global_batch_size": 40}), check=False)
    assert refused.returncode == 2 and len(error_lines(refused)) == 2, refused.stderr[-3000:]
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    refused = train(*toy_overrides(toy_inputs, existing, **FLOAT32, **{"training.global_batch_size": 40}), check=False)
    assert refused.returncode == 2 and list(existing.iterdir()) == []


def start_and_wait_for_step(command: list[str], log: Path) -> subprocess.Popen:
    """Start `command` with its output in `log`; return once it logged a training step."""
    handle = open(log, "w")
    job = subprocess.Popen(command, env=SUBPROCESS_ENV, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                           start_new_session=True)
    deadline = time.monotonic() + 240
    while "step 1/" not in log.read_text():
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return job


@pytest.mark.e2e
@pytest.mark.parametrize("nproc", [0, 2], ids=["one-plain-process", "torchrun-2-ranks"])
def test_sigterm_ends_the_run_through_its_cleanup(toy_inputs, tmp_path, nproc):
    run = tmp_path / "run"
    args = ["-m", "mpo_dist.train", "--config", str(TRAIN_CONFIG),
            *toy_overrides(toy_inputs, run, **FLOAT32, **{"training.steps": 100000, "metrics.log_interval": 1})]
    command = [sys.executable, *args] if nproc == 0 else torchrun_command(nproc, args)
    job = start_and_wait_for_step(command, tmp_path / "log.txt")
    assert (run / LOCK_NAME).is_file()
    job.send_signal(signal.SIGTERM)
    job.wait(timeout=120)
    output = (tmp_path / "log.txt").read_text()
    assert not (run / LOCK_NAME).exists(), output[-3000:]
    # Training had begun: the step in progress was saved first (preemption.py), by the one process or
    # by both ranks together, and every process left through its cleanup with exit code 143.
    assert re.search(r"mpo_dist: SIGTERM at step \d+: checkpoint \S+ saved; stopping", output), output[-3000:]
    assert job.returncode == 143, output[-3000:]
    if nproc == 2:
        assert len(re.findall(r"stopped by SIGTERM, after saving step \d+ \(rank [01]\)", output)) == 2, output[-3000:]
