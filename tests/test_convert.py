"""tools/convert_checkpoint.py: trainer checkpoints -> Hugging Face folders that from_pretrained loads."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from support import toy_overrides, train
from mpo_dist.convert import convert_checkpoint
from mpo_dist.errors import InputError

QUIET = lambda message: None


def checkpoint_model(folder: Path, tmp_path: Path, like: Path) -> torch.nn.Module:
    """The trained model, rebuilt independently of the converter: DCP -> torch.save -> load_state_dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = tmp_path / "flat.pt"
    dcp_to_torch_save(str(folder), str(flat))
    state = torch.load(flat, weights_only=False)["model_optimizer"]["model"]
    model = AutoModelForCausalLM.from_pretrained(str(like)).float()
    model.load_state_dict(state, strict=False)
    return model.eval()


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.e2e
def test_trained_llama_converts_with_equal_logits(toy_inputs, tmp_path):
    run = tmp_path / "run"
    train(*toy_overrides(toy_inputs, run, **{"training.steps": 3}))
    checkpoint = run / "checkpoints" / "step-00000003"
    trained = checkpoint_model(checkpoint, tmp_path, toy_inputs["model"])
    tokens = torch.randint(4, 16, (3, 12))
    for name, size in [("one", 5 * 10**9), ("many", 40_000)]:
        out = convert_checkpoint(checkpoint, tmp_path / name, "float32", size, log=QUIET)
        files = sorted(p.name for p in out.glob("*.safetensors"))
        assert (len(files) == 1) == (name == "one") and len(files) >= 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
        converted = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert torch.equal(logits(converted, tokens), logits(trained, tokens))
        assert not torch.equal(logits(converted, tokens), logits(AutoModelForCausalLM.from_pretrained(str(toy_inputs["model"])), tokens))
        assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    bf16 = convert_checkpoint(checkpoint, tmp_path / "bf16", "bfloat16", log=QUIET)
    assert AutoModelForCausalLM.from_pretrained(str(bf16)).dtype == torch.bfloat16


def step0_checkpoint(model_dir: Path, stories_inputs, out: Path) -> Path:
    """A checkpoint written by the Trainer's own code before any step (one process)."""
    from mpo_dist.config import load_config
    from mpo_dist.trainer import Trainer

    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"), [
        f"job.output_dir={out}", f"model.path={model_dir}", f"data.pairs={stories_inputs['pairs']}",
        f"data.reference={stories_inputs['reference']}", "loss.tau=0", "data.dref=", "data.batch_size=4",
        "training.global_batch_size=4", "data.num_workers=0", "metrics.tensorboard=false", "eval.pairs=",
        "eval.reference=", "eval.dref=", "eval.interval=0"])
    trainer = Trainer(config)
    folder = trainer.save_checkpoint()
    trainer.close()
    return folder


@pytest.mark.unit
def test_stories260k_tied_embeddings_step_0_generates_the_original_text(stories_inputs, tmp_path, one_process_group):
    from mpo_dist.producers.sample import SamplingParams, generate
    from mpo_dist.tokenizer import load_tokenizer

    model_dir = stories_inputs["model"]
    folder = step0_checkpoint(model_dir, stories_inputs, tmp_path / "run")
    out = convert_checkpoint(folder, tmp_path / "hf", "float32", 300_000, log=QUIET)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"] and "model.embed_tokens.weight" in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1
    original = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    converted = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()  # tied
    tokens = torch.randint(3, 512, (2, 20))
    assert torch.equal(logits(converted, tokens), logits(original, tokens))
    tokenizer = load_tokenizer(out)
    texts = [tokenizer.decode(generate(model, [np.array([1])], [0], SamplingParams(max_new_tokens=40, temperature=0), 2, 0,
                                       torch.device("cpu"))[0][0]) for model in (original, converted)]
    assert texts[0] == texts[1] and texts[1].startswith("Once upon a time, there was a little girl named Lily")


@pytest.mark.e2e
def test_trained_stories260k_converts_with_equal_logits(stories_inputs, tmp_path):
    run = tmp_path / "run"
    train(f"job.output_dir={run}", f"model.path={stories_inputs['model']}", f"data.pairs={stories_inputs['pairs']}",
          f"data.reference={stories_inputs['reference']}", "loss.tau=0", "data.dref=", "data.batch_size=4",
          "training.global_batch_size=8", "training.steps=2", "optim.lr=1e-3", "checkpoint.export_hf=true",
          "checkpoint.export_dtype=float32")
    checkpoint = run / "checkpoints" / "step-00000002"
    trained = checkpoint_model(checkpoint, tmp_path, stories_inputs["model"])
    exported = AutoModelForCausalLM.from_pretrained(str(run / "hf")).eval()  # the trainer's own export
    tokens = torch.randint(3, 512, (2, 16))
    assert torch.equal(logits(exported, tokens), logits(trained, tokens))
    original = AutoModelForCausalLM.from_pretrained(str(stories_inputs["model"])).eval()
    assert not torch.equal(logits(exported, tokens), logits(original, tokens))


@pytest.mark.e2e
def test_errors_name_the_problem_and_leave_nothing(toy_inputs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(*toy_overrides(toy_inputs, run, **{"training.steps": 1}))
    good = run / "checkpoints" / "step-00000001"

    with pytest.raises(ValueError, match="is not a training checkpoint"):
        convert_checkpoint(tmp_path, tmp_path / "out1", log=QUIET)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out1", log=QUIET)

    crashed = tmp_path / "crashed"
    shutil.copytree(good, crashed)
    (crashed / "checkpoint.json").unlink()  # what a save that died before completing looks like
    with pytest.raises(FileNotFoundError, match="not a complete mpo_dist checkpoint"):
        convert_checkpoint(crashed, tmp_path / "out2", log=QUIET)

    other = tmp_path / "other"
    shutil.copytree(good, other)
    config = json.loads((other / "hf" / "config.json").read_text())
    config["hidden_size"], config["intermediate_size"] = 32, 96
    (other / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not hold the model its config.json describes"):
        convert_checkpoint(other, tmp_path / "out3", log=QUIET)

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert_checkpoint(good, tmp_path / "taken", log=QUIET)

    # Damage is an input error naming the checkpoint: a truncated tensor file, a cut metadata file, a
    # tokenizer that would not load from the converted folder.
    for case, damage, message in [
        ("truncated", lambda folder: truncate(sorted(folder.glob("*.distcp"))[0], 1000), r"damaged: .* \(EOFError\)"),
        ("empty", lambda folder: truncate(sorted(folder.glob("*.distcp"))[-1], 0), r"damaged: .* \(EOFError\)"),
        ("cut-metadata", lambda folder: truncate(folder / ".metadata", 100), r"damaged: .* \(UnpicklingError"),
        ("no-tokenizer-json", lambda folder: (folder / "hf" / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        ("hostile-metadata", lambda folder: (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(tmp_path / "ran"))),
         r"refusing to load posix.system"),
    ]:
        damaged = tmp_path / case
        shutil.copytree(good, damaged)
        damage(damaged)
        with pytest.raises(InputError, match=f"{damaged} .*{message}|{damaged}: .*{message}"):
            convert_checkpoint(damaged, tmp_path / f"out-{case}", log=QUIET)
        assert not (tmp_path / f"out-{case}").exists()
    assert not (tmp_path / "ran").exists()  # the hostile metadata's code never ran

    import mpo_dist.convert as convert

    calls = []
    real_load = convert.dcp.load

    def failing_load(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(convert.dcp, "load", failing_load)
    with pytest.raises(OSError):
        convert_checkpoint(good, tmp_path / "half", max_shard_bytes=40_000, log=QUIET)
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half.tmp-*"))  # never half-written


class RunsCode:
    """What a hostile pickle holds: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.e2e
def test_cli_reports_errors(tmp_path):
    import subprocess
    import sys

    from support import REPO, SUBPROCESS_ENV

    result = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--checkpoint", str(tmp_path),
                             "--out", str(tmp_path / "out")], env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()  # one line naming the flag, no traceback
    assert line.startswith("convert_checkpoint: error:") and "--checkpoint" in line
    assert not (tmp_path / "out").exists()


def checkpoint_folder(folder: Path, metadata: bytes | None, info: bool = True) -> Path:
    """A checkpoint folder as far as convert_checkpoint looks before reading tensors: hf/config.json,
    checkpoint.json (unless `info` is false) and .metadata holding `metadata` (none: no file)."""
    (folder / "hf").mkdir(parents=True)
    (folder / "hf" / "config.json").write_text("{}")
    if info:
        (folder / "checkpoint.json").write_text(json.dumps({"step": 1, "dp_world_size": 1}))
    if metadata is not None:
        (folder / ".metadata").write_bytes(metadata)
    return folder


def real_metadata(tmp_path: Path) -> bytes:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"weight": torch.zeros(2)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    return (tmp_path / "dcp" / ".metadata").read_bytes()


@pytest.mark.e2e
def test_a_folder_without_metadata_is_a_one_line_error(tmp_path):
    """What a copy without hidden files (cp DIR/*) leaves: checkpoint.json but no .metadata."""
    from support import run_tool

    folder = checkpoint_folder(tmp_path / "step-00000001", metadata=None)
    result = run_tool("convert_checkpoint.py", "--checkpoint", folder, "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()  # no traceback
    assert line.startswith("convert_checkpoint: error: --checkpoint") and f"{folder} has checkpoint.json but no DCP .metadata" in line
    assert not (tmp_path / "out").exists()


NOT_DCP_METADATA = {  # what .metadata holds -> what the error says
    "no checkpoint.json": "not a complete mpo_dist checkpoint (no checkpoint.json)",  # .metadata is real here
    "text": "damaged: reading its DCP files failed (UnpicklingError",
    "empty": "damaged: reading its DCP files failed (",
    "a pickle of a dict": "the metadata file holds a dict, not DCP Metadata",
    "a pickle calling an int": "damaged: reading its DCP files failed (UnpicklingError: refusing to call 1",
    "a torch.save file": "damaged: reading its DCP files failed (UnpicklingError",
}


@pytest.mark.unit
@pytest.mark.parametrize("case", NOT_DCP_METADATA)
def test_a_metadata_that_is_not_dcp_metadata_is_a_one_line_error(tmp_path, case):
    import io

    saved = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, saved)
    metadata = {"no checkpoint.json": real_metadata(tmp_path), "text": b"step 1\n", "empty": b"",
                "a pickle of a dict": pickle.dumps({"step": 1}), "a pickle calling an int": b"\x80\x04K\x01)R.",
                "a torch.save file": saved.getvalue()}[case]
    folder = checkpoint_folder(tmp_path / "step-00000001", metadata, info=case != "no checkpoint.json")
    with pytest.raises(InputError) as caught:
        convert_checkpoint(folder, tmp_path / "out", log=QUIET)
    assert str(folder) in str(caught.value) and NOT_DCP_METADATA[case] in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
