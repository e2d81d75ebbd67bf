"""Sharded inference models (inference_model.py): a rank holds its share of the weights, forwards with
uneven work per rank stay in lockstep (two models beside each other included), and the numbers equal
those of a whole copy of the model, exactly in float32."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import REPO, SUBPROCESS_ENV, free_port

LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False}


def _save_model(folder: Path, seed: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(LLAMA)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))


def _inputs(rows: int, width: int, seed: int):
    from mpo_dist.logprobs import padded_rows_input

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LLAMA["vocab_size"], (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[0, width // 2 :] = 0  # one shorter row
    response = torch.zeros(rows, width, dtype=torch.bool)
    response[:, width // 3 :] = True
    return padded_rows_input(ids, mask, response & mask.bool())


# Each rank's work: (model, rows, width, seed) forwards of the log-prob method, uneven on purpose:
# rank 0 runs the policy twice then the reference; rank 1 the reference, then the policy, then stops.
# With 4 ranks in 2 shard groups of 2 (HSDP-like: groups replicate), ranks 2 and 3 form the second group.
WORK = {0: [("policy", 2, 9, 1), ("policy", 3, 7, 2), ("reference", 2, 5, 3)],
        1: [("reference", 1, 11, 4), ("policy", 2, 6, 5)],
        2: [("reference", 2, 8, 6)],
        3: [("policy", 1, 5, 7), ("policy", 2, 4, 8), ("reference", 3, 6, 9), ("policy", 1, 9, 10)]}


def _logps(models: dict, work: list) -> list[list[float]]:
    from mpo_dist.logprobs import batch_logprobs

    with torch.no_grad():
        return [batch_logprobs(models[name], _inputs(rows, width, seed)).logps.tolist() for name, rows, width, seed in work]


def _rank(rank: int, world_size: int, model_shards: int, port: int, folders: dict, out: str) -> None:
    import torch.distributed as dist

    from mpo_dist.distributed import RankInfo
    from mpo_dist.inference_model import load_inference_model
    from mpo_dist.model import read_model_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    info = RankInfo(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size)
    device = torch.device("cpu")
    policy = load_inference_model(folders["policy"], read_model_config(folders["policy"], "--model"), "float32", device,
                                  info, model_shards=model_shards, option="--model")
    reference = load_inference_model(folders["reference"], read_model_config(folders["reference"], "--reference-model"),
                                     "float32", device, info, model_shards=model_shards, option="--reference-model",
                                     lockstep=policy.lockstep)
    held = sum(p.to_local().numel() for p in policy.module.parameters())
    values = _logps({"policy": policy, "reference": reference}, WORK[rank])
    policy.finish()
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"values": values, "held": held, "describe": policy.describe()}))
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("world_size, model_shards", [(2, 0), (4, 2)])
def test_ranks_with_uneven_work_on_two_sharded_models_get_the_whole_models_numbers(tmp_path, world_size, model_shards):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    folders = {"policy": tmp_path / "policy", "reference": tmp_path / "reference"}
    _save_model(folders["policy"], seed=0)
    _save_model(folders["reference"], seed=1)
    mp.spawn(_rank, args=(world_size, model_shards, free_port(), {k: str(v) for k, v in folders.items()}, str(tmp_path)),
             nprocs=world_size, join=True)
    whole = {name: AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
             for name, folder in folders.items()}
    total = sum(p.numel() for p in whole["policy"].parameters())
    for rank in range(world_size):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["values"] == _logps(whole, WORK[rank])  # float32: bitwise, whichever rank ran what, when
        assert got["held"] == total // 2  # every tensor's first dimension is even here
        assert "sharded over 2 processes (1/2 of the weights each)" in got["describe"]


@pytest.mark.unit
def test_model_shards_must_divide_the_processes():
    from mpo_dist.errors import InputError
    from mpo_dist.parallelize import inference_mesh

    assert inference_mesh(4, 1, 2, "cpu") is None  # a whole copy per process: no mesh, no collectives
    with pytest.raises(InputError, match=r"--model-shards 3: .* a divisor of the number of processes \(4\)"):
        inference_mesh(4, 3, 4, "cpu")
    with pytest.raises(InputError, match="--model-shards -1"):
        inference_mesh(4, -1, 4, "cpu")
    with pytest.raises(InputError, match=r"--model-shards 2: .* \(1\)"):  # one process: checked too (load_inference_model)
        inference_mesh(1, 2, 1, "cpu")


def _score(model: Path, pairs: Path, out: Path, nproc: int, *flags) -> str:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(nproc)]
    result = subprocess.run([*launcher, str(REPO / "tools" / "score_reference.py"), "--model", str(model), "--pairs",
                             str(pairs), "--out", str(out), "--batch-size", "4", *flags], env=SUBPROCESS_ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _scores(folder: Path) -> dict[str, tuple[float, float]]:
    from mpo_dist.data.shards import Manifest, ShardCursor

    manifest = Manifest.read(folder, "ref_logps")
    return {key: (meta["chosen_logp"], meta["rejected_logp"]) for shard in manifest.shards
            for key, meta, _ in ShardCursor(folder / shard.name, "ref_logps", shard.num_samples)}


@pytest.mark.e2e
def test_sharded_scoring_equals_a_whole_replica(stories_inputs, tmp_path):
    """The tool at 2 processes, each holding half of stories260K: float32 scores are the bytes of one
    process's, and equal (to float32 rounding of the double sums) to a transformers replica's; bf16
    scores are within bf16's rounding of them."""
    from transformers import AutoModelForCausalLM

    from mpo_dist.producers.score import score_pairs

    model, pairs = stories_inputs["model"], stories_inputs["pairs"]
    log = _score(model, pairs, tmp_path / "sharded", 2, "--dtype", "float32", "--model-shards", "2")
    assert "sharded over 2 processes (1/2 of the weights each)" in log
    _score(model, pairs, tmp_path / "one", 1, "--dtype", "float32")
    for shard in sorted((tmp_path / "one").glob("*.tar")):
        assert (tmp_path / "sharded" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    replica = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    score_pairs(replica, pairs, tmp_path / "replica", batch_size=4, log=lambda message: None)
    assert _scores(tmp_path / "sharded") == _scores(tmp_path / "replica")

    _score(model, pairs, tmp_path / "bf16", 2, "--dtype", "bfloat16", "--model-shards", "2")
    exact, bf16 = _scores(tmp_path / "sharded"), _scores(tmp_path / "bf16")
    worst = max(abs(a - b) / max(abs(a), 1.0) for key in exact for a, b in zip(exact[key], bf16[key]))
    assert 0 < worst < 0.05  # bf16 keeps 8 bits of mantissa: sums of ~100 token log-probs move by about 1%
