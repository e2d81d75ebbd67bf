"""batch.MicroBatch, objective.Objective and stream.TrainingStream: the sequence-index contract read
back per sample, the loss of a micro-batch equal to the loss of its parts computed alone, and one
saved state for both streams that resumes where it left off."""

from __future__ import annotations

import itertools
from functools import partial

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from shard_factory import make_dref, make_pairs, make_reference
from mpo_dist.batch import MicroBatch
from mpo_dist.config import DataConfig, LossConfig
from mpo_dist.data.collate import collate_dref, collate_pairs
from mpo_dist.data.layout import lay_out
from mpo_dist.data.loader import build_dref_loader, build_pair_loader
from mpo_dist.logprobs import sequence_logprobs
from mpo_dist.losses import build_loss
from mpo_dist.objective import Objective, policy_logprobs
from mpo_dist.stream import TrainingStream

pytestmark = pytest.mark.unit

VOCAB = 97


def positions_cost(rows: int, width: int, dense_attention: bool) -> float:
    return float(rows * width)


def layout(packing: str):
    return partial(lay_out, packing=packing, pad_token_id=0, cost=positions_cost)


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def collated(seed: int = 0, pairs: int = 4, dref: int = 3, pad_last: bool = True):
    rng = np.random.default_rng(seed)
    ids = lambda: rng.integers(1, VOCAB, size=int(rng.integers(2, 9)))  # noqa: E731
    pair_samples = [{"key": f"p{i}", "label": 1.0 - 0.25 * i, "prompt_ids": ids(), "chosen_ids": ids(),
                     "rejected_ids": ids(), "ref_chosen_logp": -10.0 - i, "ref_rejected_logp": -12.0 - i}
                    for i in range(pairs)]
    dref_samples = [{"key": f"d{i}", "prompt_ids": ids(), "response_ids": ids(), "ref_logp": -9.0 - i} for i in range(dref)]
    pad = np.zeros(pairs, bool)
    pad[-1] = pad_last  # a flagged duplicate: weight 0
    return collate_pairs(pair_samples, pad), collate_dref(dref_samples, np.zeros(dref, bool)), pair_samples, dref_samples


def alone(model, prompts, responses) -> torch.Tensor:
    """Each (prompt, response)'s log-prob sum, computed alone in its own padded row."""
    out = []
    for prompt, response in zip(prompts, responses):
        ids = torch.from_numpy(np.concatenate([prompt, response]))[None]
        mask = torch.ones_like(ids, dtype=torch.bool)
        response_mask = torch.zeros_like(mask)
        response_mask[0, len(prompt):] = True
        out.append(sequence_logprobs(model, ids, mask, response_mask).logps[0])
    return torch.stack(out)


@pytest.mark.parametrize("packing", ["never", "always"])
def test_chosen_rejected_and_dref_parts_are_each_samples_own_logprobs(packing):
    model = tiny_model()
    pairs, dref, pair_samples, dref_samples = collated()
    batch = MicroBatch.build(pairs, dref, layout(packing))
    with torch.no_grad():
        logps = policy_logprobs(model, batch).logps
        prompts = [s["prompt_ids"] for s in pair_samples]
        expected = {"chosen": alone(model, prompts, [s["chosen_ids"] for s in pair_samples]),
                    "rejected": alone(model, prompts, [s["rejected_ids"] for s in pair_samples]),
                    "dref": alone(model, [s["prompt_ids"] for s in dref_samples], [s["response_ids"] for s in dref_samples])}
    assert len(logps) == 2 * 4 + 3 and batch.num_pairs == 4
    torch.testing.assert_close(batch.chosen(logps), expected["chosen"], rtol=0, atol=1e-4)
    torch.testing.assert_close(batch.rejected(logps), expected["rejected"], rtol=0, atol=1e-4)
    torch.testing.assert_close(batch.dref_part(logps), expected["dref"], rtol=0, atol=1e-4)


def test_counts_and_tensors_are_those_of_the_samples():
    pairs, dref, pair_samples, dref_samples = collated()
    batch = MicroBatch.build(pairs, dref, layout("never"))
    tokens = sum(len(s["prompt_ids"]) * 2 + len(s["chosen_ids"]) + len(s["rejected_ids"]) for s in pair_samples)
    tokens += sum(len(s["prompt_ids"]) + len(s["response_ids"]) for s in dref_samples)
    assert batch.counts.pairs == 3 and batch.counts.dref == 3  # the padding duplicate is not counted
    assert batch.counts.tokens == tokens and batch.counts.positions == batch.inputs.input_ids.numel()
    assert batch.counts.real_positions == tokens  # padded rows: every token of every sequence computed once
    assert batch.counts.head_targets == len(batch.inputs.targets)
    assert batch.pairs.keys == ["p0", "p1", "p2", "p3"] and batch.pairs.real.tolist() == [True, True, True, False]
    assert batch.pairs.ref_rejected_logps.tolist() == [-12.0, -13.0, -14.0, -15.0]
    assert batch.pairs.chosen_lengths.tolist() == [float(len(s["chosen_ids"])) for s in pair_samples]
    assert batch.dref.ref_logps.tolist() == [-9.0, -10.0, -11.0] and batch.dref.keys == ["d0", "d1", "d2"]
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.inputs.input_ids, batch.inputs.input_ids) and moved.counts == batch.counts
    only_dref = MicroBatch.build(None, dref, layout("never"))
    assert only_dref.num_pairs == 0 and only_dref.pairs is None and only_dref.counts.pairs == 0
    assert torch.equal(only_dref.dref_part(torch.arange(3.0)), torch.arange(3.0))


def test_the_objective_is_the_loss_of_the_parts_with_real_over_total_weights():
    model = tiny_model()
    pairs, dref, _, _ = collated()
    batch = MicroBatch.build(pairs, dref, layout("always"))
    loss_fn = build_loss(LossConfig(name="mpo", beta=0.1, tau=0.05))
    with torch.no_grad():
        out = Objective(loss_fn)(model, batch, pair_total=6, dref_total=5)
        logps = policy_logprobs(model, batch).logps
    c, r, d = logps[:4], logps[4:8], logps[8:]
    expected = loss_fn(c, r, batch.pairs.ref_chosen_logps, batch.pairs.ref_rejected_logps, label=batch.pairs.label,
                       weight=torch.tensor([1, 1, 1, 0]) / 6, chosen_lengths=batch.pairs.chosen_lengths,
                       rejected_lengths=batch.pairs.rejected_lengths, dref_policy_logps=d,
                       dref_ref_logps=batch.dref.ref_logps, dref_weight=torch.ones(3) / 5,
                       dref_lengths=batch.dref.response_lengths)
    assert torch.equal(out.logps, logps) and out.loss.metrics.keys() == expected.metrics.keys()
    for name, value in expected.metrics.items():
        assert torch.equal(out.loss.metrics[name], value), name
    assert "dref_kl" in out.loss.metrics
    assert Objective(loss_fn)(model, MicroBatch.build(None, dref, layout("never")), pair_total=1).loss is None


@pytest.fixture
def shard_sets(tmp_path):
    make_pairs(tmp_path / "pairs", [9, 7])
    make_reference(tmp_path / "ref", tmp_path / "pairs")
    make_dref(tmp_path / "dref", [5, 4])
    return tmp_path


def stream_of(root, accum: int = 2) -> TrainingStream:
    data = DataConfig(pairs=str(root / "pairs"), reference=str(root / "ref"), dref=str(root / "dref"), batch_size=2,
                      dref_batch_size=3)
    stream = TrainingStream(build_pair_loader(data, seed=3, dp_rank=0, dp_world_size=1),
                            build_dref_loader(data, seed=3, dp_rank=0, dp_world_size=1), layout("never"))
    stream.set_micro_batches_per_step(accum)
    return stream


def keys_of(batches) -> list[tuple[list[str], list[str]]]:
    return [(batch.pairs.keys, batch.dref.keys) for batch in batches]


def test_one_state_for_both_streams_resumes_where_it_left_off(shard_sets):
    full = list(itertools.islice(stream_of(shard_sets), 14))  # beyond an epoch of pairs (8 batches of 2)
    first = stream_of(shard_sets)
    batches = iter(first)
    done = [next(batches) for _ in range(6)]
    state = first.state_dict()
    assert set(state) == {"pairs", "dref"} and int(state["pairs"]["samples"]) == 12
    resumed = stream_of(shard_sets)
    resumed.load_state_dict(state)
    assert resumed.resumed() == []  # exact: nothing to say
    rest = list(itertools.islice(resumed, 8))
    assert keys_of(done + rest) == keys_of(full)
    assert [b.position.pairs_epoch for b in rest] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert rest[1].position.pairs_progress == pytest.approx(1.0)


def test_a_stream_the_checkpoint_lacks_starts_at_its_beginning_and_the_rest_resumes(shard_sets, tmp_path):
    """A DPO run's checkpoint has no D_ref position; resumed with MPO's tau term, the pairs go on where
    they were, D_ref starts at its beginning, and the trainer is told so (not a "damaged" checkpoint)."""
    from mpo_dist.checkpoint import Checkpointer

    def stream(dref: bool) -> TrainingStream:
        made = stream_of(shard_sets)
        if not dref:
            made = TrainingStream(made.loaders["pairs"], None, made.layout)
            made.set_micro_batches_per_step(2)
        return made

    without_dref = stream(dref=False)
    batches = iter(without_dref)
    done = [next(batches).pairs.keys for _ in range(6)]
    saver = Checkpointer(tmp_path / "ckpt", 1, rank=0, dp_rank=0, dp_world_size=1, log=lambda _: None)
    folder = saver.save(3, {"data": without_dref}, {})

    resumed = stream(dref=True)
    info = saver.load(folder, {"data": resumed}, {})
    assert info["missing"] == ["data.dref"]
    assert [name for name, _ in resumed.resumed()] == ["dref"]
    assert "starts at its beginning" in resumed.resumed()[0][1]
    full = list(itertools.islice(stream_of(shard_sets), 8))
    rest = list(itertools.islice(resumed, 2))
    assert done + [b.pairs.keys for b in rest] == [b.pairs.keys for b in full]
    assert [b.dref.keys for b in rest] == [b.dref.keys for b in full[:2]]  # D_ref from its first batch
