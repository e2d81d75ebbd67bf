"""model.attention (attention.py): packed rows under the varlen pieces (the CPU twin of varlen_attn,
through transformers' attention interface) give the dense packed mask's per-sequence log-probs and
parameter gradients for Llama, Qwen2 (GQA) and GPT-2, with D_ref rows, also under FSDP with
activation checkpointing; padded rows keep SDPA; what the path cannot serve is refused; and the
trainer's losses are the same under either path."""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from support import TINY_VOCAB, TRAIN_CONFIG, packed_micro_batch, tiny_causal_lm, toy_overrides
from mpo_dist.attention import PACKED_IMPLEMENTATION, packed_attention_forward, resolve_attention, use_packed_attention
from mpo_dist.batch import MicroBatch
from mpo_dist.config import load_config
from mpo_dist.errors import InputError
from mpo_dist.logprobs import batch_logprobs
from mpo_dist.metric_names import LOSS
from mpo_dist.objective import policy_logprobs
from mpo_dist.varlen import VarlenDescriptors

pytestmark = pytest.mark.unit

# fp32: the pieces and the dense mask differ only in summation order (softmax over <= ~60 keys):
# per-sequence log-prob sums (magnitude ~100) and parameter gradients (magnitude up to ~8) agree to
# within a few float32 ulps of those magnitudes, well inside 1e-5.
TOLERANCE = dict(rtol=0, atol=1e-5)
def logps_and_grads(model, batch: MicroBatch):
    model.zero_grad()
    logps = policy_logprobs(model, batch).logps
    weight = torch.linspace(-1, 1, logps.numel())
    (logps * weight).sum().backward()
    return logps.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_varlen_equals_dense_log_probs_and_gradients(kind):
    dense_batch, varlen_batch = packed_micro_batch(varlen=False), packed_micro_batch(varlen=True)
    assert dense_batch.inputs.varlen is None and isinstance(varlen_batch.inputs.varlen, VarlenDescriptors)
    inputs = varlen_batch.inputs  # pairs packed several to a row, with D_ref samples
    assert inputs.packed and (inputs.segment_ids.amax(-1) >= 1).any() and (inputs.branch_ids == 2).any()
    model = tiny_causal_lm(kind)
    want, want_grads = logps_and_grads(model, dense_batch)
    assert model.config._attn_implementation == "sdpa"
    got, got_grads = logps_and_grads(model, varlen_batch)
    assert model.config._attn_implementation == PACKED_IMPLEMENTATION  # switched on first use
    assert got.shape == (2 * 5 + 3,)
    torch.testing.assert_close(got, want, **TOLERANCE)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) == len(list(model.parameters()))
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOLERANCE, msg=name)
    # Under the varlen implementation, padded rows (SDPA with their mask) and a packed batch without
    # pieces (SDPA with the dense mask) still give the same numbers.
    padded = packed_micro_batch(varlen=True, packing="never")
    assert padded.inputs.varlen is None
    torch.testing.assert_close(logps_and_grads(model, padded)[0], want, **TOLERANCE)
    torch.testing.assert_close(logps_and_grads(model, dense_batch)[0], want, **TOLERANCE)


def test_the_attention_sees_the_pieces(monkeypatch):
    """The descriptors reach every layer's attention function (not a silent SDPA fallback)."""
    import mpo_dist.attention as attention

    calls = []
    real = attention.varlen_attention
    monkeypatch.setattr(attention, "varlen_attention", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    model = tiny_causal_lm("llama")
    batch_logprobs(model, packed_micro_batch(varlen=True).inputs)
    assert len(calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_varlen_equals_dense_under_fsdp_with_activation_checkpointing(kind, one_process_group):
    from mpo_dist.config import ParallelConfig
    from mpo_dist.parallelize import apply_fsdp, build_mesh

    dense_batch, varlen_batch = packed_micro_batch(varlen=False), packed_micro_batch(varlen=True)
    results = []
    for batch in (dense_batch, varlen_batch):
        model = tiny_causal_lm(kind)  # a fresh model each: FSDP shards it in place
        parallel = ParallelConfig(dp_shard=1, activation_checkpointing=True)
        apply_fsdp(model, build_mesh(parallel, 1, "cpu"), parallel, "float32")
        model.train()
        assert model.model.layers[0].gradient_checkpointing if kind == "llama" else model.transformer.h[0].gradient_checkpointing
        results.append(logps_and_grads(model, batch))
        assert (model.config._attn_implementation == PACKED_IMPLEMENTATION) == (batch is varlen_batch)
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, **TOLERANCE)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name].full_tensor(), want_grads[name].full_tensor(), **TOLERANCE, msg=name)


def test_choice_by_device_and_refusals():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    llama = tiny_causal_lm("llama").config
    choices = ("auto", "dense", "varlen", "flex")
    assert [resolve_attention(choice, cpu, llama, training=False) for choice in choices] == ["dense", "dense", "varlen", "flex"]
    assert [resolve_attention(choice, cuda, llama) for choice in choices] == ["varlen", "dense", "varlen", "flex"]
    # float32 on CUDA: the flash kernel does not compute it, so auto keeps the dense mask (varlen's twin is a loop).
    assert resolve_attention("auto", cuda, llama, dtype=torch.float32) == "dense"
    assert resolve_attention("auto", cuda, llama, dtype=torch.float16) == "varlen"
    windowed = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                           use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert resolve_attention("auto", cuda, windowed) == "dense"  # auto falls back to the dense path
    capped = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
    capped.attn_logit_softcapping = 50.0
    for path in ("varlen", "flex"):
        with pytest.raises(InputError, match=rf"^model.attention={path} cannot serve this model: sliding-window "
                                             r"attention \(sliding_window=16\); set model.attention=dense$"):
            resolve_attention(path, cuda, windowed)
        with pytest.raises(InputError, match=rf"^model.attention={path} cannot serve this model: soft-capped attention "
                                             r"scores \(attn_logit_softcapping=50.0\)"):
            resolve_attention(path, cuda, capped, training=False)
    with pytest.raises(InputError, match="model.attention must be one of auto, dense, varlen, flex, got 'flash'"):
        resolve_attention("flash", cpu, llama)


def test_attention_dropout_in_training_is_refused():
    model = tiny_causal_lm("llama")
    use_packed_attention(model, "varlen")
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(InputError, match=r"^model.attention=varlen does not apply attention dropout \(here 0.1\)"):
        batch_logprobs(model, packed_micro_batch(varlen=True).inputs)
    query = torch.zeros(1, 2, 3, 4)
    with pytest.raises(InputError, match="model.attention=varlen cannot serve sliding_window=8"):
        packed_attention_forward(model.model.layers[0].self_attn, query, query, query, None, sliding_window=8,
                                 packed_attention=packed_micro_batch(varlen=True).inputs.varlen)


def test_the_trainer_losses_are_the_same_under_either_path(toy_inputs, one_process_group, tmp_path):
    from mpo_dist.trainer import Trainer

    losses = {}
    for attention in ("dense", "varlen"):
        out = tmp_path / attention
        config = load_config(str(TRAIN_CONFIG), toy_overrides(toy_inputs, out, **{
            "model.attention": attention, "data.packing": "always", "training.steps": 3,
            "metrics.tensorboard": "false"}))
        trainer = Trainer(config)
        try:
            assert trainer.varlen == (attention == "varlen")
            trainer.train()
        finally:
            trainer.close()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[attention] = [r[LOSS] for r in records if LOSS in r]
    assert len(losses["dense"]) == 3
    np.testing.assert_allclose(losses["varlen"], losses["dense"], rtol=0, atol=1e-5)


def test_compiled_layers_run_the_varlen_pieces_eagerly_without_recompiling():
    """parallel.compile compiles each decoder layer; the pieces' sizes are host ints that change with
    every micro-batch, so a graph that traced them would recompile each time (then give up compiling).
    Two batches of one shape but different pieces: no new graph for the second, values as eager."""
    from mpo_dist.batch import pair_documents
    from mpo_dist.data.layout import lay_out
    from mpo_dist.logprobs import token_logprobs

    torch.manual_seed(0)
    model = tiny_causal_lm("llama")
    use_packed_attention(model, "varlen")
    rng = np.random.default_rng(0)

    def one_pair_row(prompt: int, chosen: int, rejected: int):
        documents = pair_documents([rng.integers(1, TINY_VOCAB, prompt)], [rng.integers(1, TINY_VOCAB, chosen)],
                                   [rng.integers(1, TINY_VOCAB, rejected)])
        return lay_out(documents, packing="always", pad_token_id=0, cost=lambda *_, **__: 0.0, pack_tokens=16, varlen=True)

    batches = [one_pair_row(6, 5, 5), one_pair_row(4, 7, 5)]  # a row of 16 each, keys 11 + 11 vs 11 + 9
    assert batches[0].input_ids.shape == batches[1].input_ids.shape
    assert batches[0].varlen.host_cu_seq_k != batches[1].varlen.host_cu_seq_k
    eager = [token_logprobs(model, batch) for batch in batches]
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    for layer in model.model.layers:
        layer.compile(backend=counting_backend)
    first = token_logprobs(model, batches[0])
    graphs_after_first = len(graphs)
    second = token_logprobs(model, batches[1])
    assert graphs_after_first > 0 and len(graphs) == graphs_after_first
    torch.testing.assert_close(first, eager[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(second, eager[1], rtol=0, atol=1e-6)


def pair_rows(seed: int, prompt: tuple[int, int], response: tuple[int, int], pairs: int = 4):
    from mpo_dist.batch import pair_documents

    rng = np.random.default_rng(seed)
    ids = lambda low, high: [rng.integers(1, TINY_VOCAB, int(rng.integers(low, high + 1))) for _ in range(pairs)]  # noqa: E731
    return pair_documents(ids(*prompt), ids(*response), ids(*response))


def no_cost(*_, **__) -> float:
    return 0.0


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_rows_take_prepared_masks_with_transformers_numbers(padding_side):
    """The trainer's model (switched to the packed implementation on every path) gets padded rows' 4-D
    mask from the log-prob path, or none without padding, so transformers reads nothing back; the
    numbers are those of transformers' own masks from the 2-D one, either padding side."""
    from mpo_dist.data.layout import lay_out
    from mpo_dist.logprobs import token_logprobs

    plain, switched = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    use_packed_attention(switched, "dense")
    assert switched.config._attn_implementation == PACKED_IMPLEMENTATION and plain.config._attn_implementation == "sdpa"
    uneven = lay_out(pair_rows(0, (2, 9), (1, 8)), packing="never", pad_token_id=0, cost=no_cost, padding_side=padding_side)
    even = lay_out(pair_rows(1, (5, 5), (4, 4)), packing="never", pad_token_id=0, cost=no_cost, padding_side=padding_side)
    assert uneven.num_real_positions < uneven.num_positions and even.num_real_positions == even.num_positions
    with torch.no_grad():
        for batch in (uneven, even):
            torch.testing.assert_close(token_logprobs(switched, batch), token_logprobs(plain, batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["Qwen2", "Mistral", "Gemma 2", "Gemma 3"])
def test_sliding_windows_and_soft_caps_on_packed_rows_equal_the_models_own_forward(family):
    """Packed rows on the dense path apply each layer's sliding window (by position: a rejected response
    continues its prompt's positions) and Gemma 2's soft-capped scores (eager attention): per-sequence
    log-probs and gradients equal padded rows', which run transformers' own masks (the model's forward).
    The window bites: without it the numbers differ."""
    from transformers import AutoModelForCausalLM

    from mpo_dist.data.layout import lay_out
    from mpo_dist.model import build_model_from_config
    from model_families import WINDOW, family_config

    config = family_config(family, TINY_VOCAB)
    torch.manual_seed(0)
    model = build_model_from_config(config, torch.float32, "cpu")
    use_packed_attention(model, "dense")  # the trainer's call: such a model keeps transformers' masks for padded rows
    assert model.config._attn_implementation == ("eager" if family == "Gemma 2" else "sdpa")
    documents = pair_rows(2, (8, 12), (6, 10))
    packed = lay_out(documents, packing="always", pad_token_id=0, cost=no_cost)
    padded = lay_out(documents, packing="never", pad_token_id=0, cost=no_cost)
    assert packed.packed and int(packed.position_ids.max()) >= 2 * WINDOW  # responses reach past the window
    def logps_and_grads_of(inputs):
        model.zero_grad()
        logps = batch_logprobs(model, inputs).logps
        (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
        return logps.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    got, got_grads = logps_and_grads_of(packed)
    want, want_grads = logps_and_grads_of(padded)
    assert len(want_grads) == len(list(model.parameters()))
    torch.testing.assert_close(got, want, **TOLERANCE)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOLERANCE, msg=name)
    unwindowed = AutoModelForCausalLM.from_config(family_config(family, TINY_VOCAB).__class__(
        **{**config.to_dict(), "sliding_window": 10 * WINDOW}), attn_implementation=model.config._attn_implementation)
    unwindowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (batch_logprobs(unwindowed, packed).logps - got).abs().max() > 1e-3


def test_what_no_prepared_mask_serves_keeps_transformers_masks_and_padded_rows():
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    from mpo_dist.attention import attention_switchable, packing_for
    from mpo_dist.data.layout import lay_out
    from mpo_dist.logprobs import token_logprobs

    chunked = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
    chunked.attention_chunk_size = 4
    assert packing_for("auto", chunked) == "never" and packing_for("never", chunked) == "never"
    with pytest.raises(InputError, match=r"^data.packing=always cannot serve this model: chunked attention "
                                         r"\(attention_chunk_size=4\), which packed rows' attention masks do not apply; "
                                         r"set data.packing=never"):
        packing_for("always", chunked)
    windowed = tiny_causal_lm("qwen2")
    packed = lay_out(pair_rows(2, (4, 8), (3, 6)), packing="always", pad_token_id=0, cost=no_cost)
    windowed.config.attention_chunk_size = 4
    with pytest.raises(InputError, match="packed rows cannot serve this model: chunked attention"):
        token_logprobs(windowed, packed)
    # A class outside transformers' attention interface keeps its attention on the dense path; varlen is refused.
    neo = AutoModelForCausalLM.from_config(GPTNeoConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                                        attention_types=[[["global"], 2]], max_position_embeddings=64))
    assert not attention_switchable(neo) and attention_switchable(windowed)
    before = neo.config._attn_implementation
    use_packed_attention(neo, "dense")
    assert neo.config._attn_implementation == before
    with pytest.raises(InputError, match=r"^model.attention=varlen cannot serve this model: its class does not take "
                                         r"a registered attention function"):
        use_packed_attention(neo, "varlen")
    cuda = torch.device("cuda")
    assert resolve_attention("auto", cuda, neo.config, switchable=False) == "dense"
    with pytest.raises(InputError, match="model.attention=flex cannot serve this model: its class does not take"):
        resolve_attention("flex", cuda, neo.config, switchable=False)
