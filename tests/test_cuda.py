"""The tests that matter on a CUDA GPU: the chunked log-prob head, packed masks in the attention
kernel, the sampler's KV cache, and the trainer end to end (bf16, recomputed activations, packing,
resume, conversion, compile). Each runs twice: on the CPU (always) and on CUDA (marked `cuda`, skipped
without a GPU; tools/gpu_check.sh runs them with `pytest -m cuda`). Both twins run the same code and
assertions; only tolerances depend on the device and dtype. Tiny random-init models only, no
../shared/data (a GPU machine need not have it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from support import (NO_EVAL, REPO, SUBPROCESS_ENV, TRAIN_CONFIG, flat_checkpoint, run_tool, toy_overrides,
                      torchrun_command)
from mpo_dist.checkpoint import MODEL_PREFIX
from mpo_dist.data.collate import pad_sequences
from mpo_dist.attention import use_packed_attention
from mpo_dist.batch import pair_documents, single_documents
from mpo_dist.data.layout import lay_out
from mpo_dist.flops import CostModel
from mpo_dist.logprobs import batch_logprobs, padded_rows_input, token_logprobs
from mpo_dist.metrics_file import read_metrics
from mpo_dist.producers.sample import SamplingParams, generate

NEEDS_GPU = "needs a CUDA GPU (tools/gpu_check.sh runs these on one)"
DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=[pytest.mark.cuda,
                                       pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_GPU)])]
VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


def tiny_llama(device: str, dtype: torch.dtype = torch.float32):
    """A seeded random-init Llama with SDPA attention, as model.build_model makes the trainer's."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().to(device)
    assert model.config._attn_implementation == "sdpa"
    # Parameters in `dtype`, buffers (the rotary frequencies) kept in float32, as the trainer's mixed precision
    # and from_pretrained(dtype=...) have them; model.to(dtype) would round the frequencies to bf16 too.
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model


def random_tokens(rng, count: int, low: int, high: int) -> list[np.ndarray]:
    return [rng.integers(1, VOCAB, size=rng.integers(low, high + 1)) for _ in range(count)]


def direct_token_logps(model, prompts, responses, device) -> list[torch.Tensor]:
    """Each row alone, unpadded, through model.forward: full float32 log_softmax, the response tokens' log-probs."""
    rows = []
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor(np.concatenate([prompt, response]), device=device)[None]
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        rows.append(logp[len(prompt) - 1 :])
    return rows


# Float32: the chunked head, the padded batch and the direct forward differ by float rounding only (1e-6
# measured). bf16 (what the trainer computes in) rounds every op's output to 8 bits of mantissa: the head's bf16
# logits (|logit| < 4 here, where a bf16 step is 2**-6) may round differently when a chunk's matmul picks another
# kernel; a padded batch and one row alone run other shapes through the layers (up to 0.016 a token measured on
# CPU over 8 seeds); against float32 the rounding of every layer adds up (up to 0.04 a token, and 0.08 on a sum
# of up to 11 tokens). The tolerances leave 3x that for other kernels, and stay far below the spread of the
# tokens' log-probs (standard deviation 0.8), so a wrong token or position would still fail.
ATOL = {torch.float32: {"chunking": 1e-5, "same_dtype": 1e-5, "float32": 1e-5, "sum": 1e-4},
        torch.bfloat16: {"chunking": 0.03, "same_dtype": 0.05, "float32": 0.12, "sum": 0.25}}


@pytest.mark.unit
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_chunked_head_equals_the_unchunked_head_and_a_direct_log_softmax(device, dtype):
    """token_logprobs / batch_logprobs in chunks of 5 head positions = one chunk = log_softmax(model(x).logits)."""
    atol = ATOL[dtype]
    rng = np.random.default_rng(0)
    prompts, responses = random_tokens(rng, 6, 1, 8), random_tokens(rng, 6, 1, 11)
    batch = pad_sequences(prompts, responses, pad_token_id=0)
    inputs = padded_rows_input(batch["input_ids"], batch["attention_mask"], batch["response_mask"]).to(device)
    model, reference = tiny_llama(device, dtype), tiny_llama(device)  # the same weights, in dtype and in float32
    with torch.no_grad():
        chunked, whole = token_logprobs(model, inputs, chunk_tokens=5), token_logprobs(model, inputs, chunk_tokens=4096)
        sums = batch_logprobs(model, inputs, chunk_tokens=5)
        direct, direct_float32 = (direct_token_logps(m, prompts, responses, device) for m in (model, reference))
    assert chunked.device.type == device and chunked.dtype == torch.float32 and len(chunked) == sum(map(len, responses))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=atol["chunking"])
    for row, (want, want_float32) in enumerate(zip(direct, direct_float32)):
        got = chunked[inputs.sequence_index == row]
        torch.testing.assert_close(got, want, rtol=0, atol=atol["same_dtype"])
        torch.testing.assert_close(got, want_float32, rtol=0, atol=atol["float32"])
    torch.testing.assert_close(sums.logps, torch.stack([w.sum() for w in direct_float32]), rtol=0, atol=atol["sum"])
    assert sums.num_tokens.tolist() == [len(r) for r in responses]
    assert torch.cat(direct_float32).std() > 5 * atol["float32"]  # tokens' values differ far more than the tolerance


@pytest.mark.unit
@pytest.mark.parametrize("device", DEVICES)
def test_recomputed_head_chunks_give_the_direct_gradients(device, monkeypatch):
    """With every head chunk recomputed in the backward (checkpointed), parameter gradients equal the direct path's."""
    from mpo_dist import logprobs

    monkeypatch.setattr(logprobs, "KEEP_LOGITS_BYTES", 0)  # always recompute
    rng = np.random.default_rng(1)
    prompts, responses = random_tokens(rng, 5, 1, 8), random_tokens(rng, 5, 1, 11)
    batch = pad_sequences(prompts, responses, pad_token_id=0)
    inputs = padded_rows_input(batch["input_ids"], batch["attention_mask"], batch["response_mask"]).to(device)
    model = tiny_llama(device)
    batch_logprobs(model, inputs, chunk_tokens=5).logps.sum().backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    torch.stack([row.sum() for row in direct_token_logps(model, prompts, responses, device)]).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


# Packed and padded rows compute the same numbers through different attention shapes (a 4-D boolean mask over
# several documents per row, against a 2-D padding mask): float32 agrees to rounding (1e-5 measured on CPU); in
# bf16 the two layouts round differently (other shapes, kernels and reduction orders): up to 0.03 measured on CPU
# over 8 seeds, on sums of up to 22 tokens' log-probs that spread with a standard deviation of 11.
PACKING_ATOL = {torch.float32: 1e-4, torch.bfloat16: 0.15}


@pytest.mark.unit
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_packed_rows_give_the_log_probs_of_padded_rows(device, dtype):
    """Pairs sharing their prompt plus D_ref samples, packed under the 4-D mask in SDPA = the same padded, per sequence."""
    rng = np.random.default_rng(2)
    prompts, chosen, rejected = random_tokens(rng, 5, 2, 10), random_tokens(rng, 5, 1, 9), random_tokens(rng, 5, 1, 9)
    dref_prompts, dref_responses = random_tokens(rng, 3, 2, 10), random_tokens(rng, 3, 1, 12)
    documents = pair_documents(prompts, chosen, rejected) + single_documents(dref_prompts, dref_responses, first_index=10)
    # bucket_shapes as the trainer has it by default: rows of padding only are added to the packed batch too.
    model = tiny_llama(device, dtype)
    cost = CostModel.of(model).layout_cost
    packed = lay_out(documents, packing="always", pad_token_id=0, cost=cost, bucket_shapes=True)
    padded = lay_out(documents, packing="never", pad_token_id=0, cost=cost, bucket_shapes=True)
    assert packed.packed and not padded.packed and packed.num_positions < padded.num_positions
    with torch.no_grad():
        packed_out, padded_out = batch_logprobs(model, packed.to(device)), batch_logprobs(model, padded.to(device))
    assert packed_out.logps.device.type == device
    assert torch.equal(packed_out.num_tokens, padded_out.num_tokens) and packed_out.num_tokens.min() > 0
    torch.testing.assert_close(packed_out.logps, padded_out.logps, rtol=0, atol=PACKING_ATOL[dtype])
    assert packed_out.logps.std() > 10 * PACKING_ATOL[dtype]  # the sequences' values differ far more than the tolerance


# The paths' gradients against the dense path's, relative L2 over all parameters: float32 rounding in
# float32; in bf16 a reasoned bound (the kernels reduce in other orders, each output rounded to 8 bits).
GRADIENT_RTOL = {torch.float32: 1e-4, torch.bfloat16: 0.05}


@pytest.mark.unit
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("path", ["varlen", "flex"])
def test_packed_attention_paths_give_the_dense_masks_log_probs_and_gradients(device, dtype, path):
    """model.attention=varlen (on CUDA in bf16: torch's flash varlen_attn; elsewhere its twin) and flex
    (compiled on CUDA; forward only on CPU) against the dense 4-D mask, same packed pairs and D_ref rows."""
    rng = np.random.default_rng(3)
    prompts, chosen, rejected = random_tokens(rng, 5, 2, 10), random_tokens(rng, 5, 1, 9), random_tokens(rng, 5, 1, 9)
    documents = (pair_documents(prompts, chosen, rejected)
                 + single_documents(random_tokens(rng, 3, 2, 10), random_tokens(rng, 3, 1, 12), first_index=10))
    backward = not (path == "flex" and device == "cpu")  # torch 2.13: no FlexAttention backward on CPU
    results = {}
    for name in ("dense", path):
        model = tiny_llama(device, dtype)
        use_packed_attention(model, name)
        batch = lay_out(documents, packing="always", pad_token_id=0, cost=CostModel.of(model).layout_cost,
                        bucket_shapes=True, varlen=name == "varlen").to(device)
        with torch.set_grad_enabled(backward):
            logps = batch_logprobs(model, batch).logps
            if backward:
                logps.sum().backward()
        gradient = torch.cat([p.grad.float().reshape(-1) for p in model.parameters()]) if backward else None
        results[name] = (logps.detach(), gradient)
    (dense, dense_gradient), (got, gradient) = results["dense"], results[path]
    torch.testing.assert_close(got, dense, rtol=0, atol=PACKING_ATOL[dtype])
    assert dense.std() > 10 * PACKING_ATOL[dtype]
    if backward:
        assert (gradient - dense_gradient).norm() <= GRADIENT_RTOL[dtype] * dense_gradient.norm()

def argmax_loop(model, prompt: np.ndarray, max_new_tokens: int, eos: list[int], device) -> list[int]:
    """Greedy decoding the plainest way: one prompt, the whole prefix through the model at every step, no cache."""
    ids = prompt.tolist()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1].argmax())
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt):]


@pytest.mark.unit
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_sampling_with_the_kv_cache_equals_recomputing_without_it(device):
    """generate at temperature 0, batched (left padding, rows leaving, refills joining) = an uncached argmax loop."""
    model = tiny_llama(device)
    rng = np.random.default_rng(3)
    prompts = random_tokens(rng, 7, 1, 9)
    max_new = 16
    free_running = [argmax_loop(model, prompt, max_new, [], device) for prompt in prompts]
    # Stop ids picked from the free-running outputs so that responses end at different steps.
    eos = sorted({free_running[0][3], free_running[1][8], free_running[2][0]})
    expected = [argmax_loop(model, prompt, max_new, eos, device) for prompt in prompts]
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    for batch_size, refill_slots in [(None, None), (3, 1)]:
        results = generate(model, prompts, [0] * len(prompts), params, eos, 0, torch.device(device),
                           batch_size=batch_size, refill_slots=refill_slots)
        assert [response.tolist() for response, _ in results] == expected, (batch_size, refill_slots)
        assert [reason for _, reason in results] == ["eos" if tokens[-1] in eos else "length" for tokens in expected]
    assert len({len(tokens) for tokens in expected}) > 2  # rows ended at different steps: the batch narrowed and refilled


# ------------------------------------------------------------------------------------------ the trainer


def train_on(device: str, toy: dict, out: Path, **extra) -> subprocess.CompletedProcess:
    """The trainer under torchrun, one process, on `device`: the CPU twin hides any GPU (CUDA_VISIBLE_DEVICES=""),
    so it runs on CPU with gloo even on a GPU machine; the cuda twin leaves the GPU visible (NCCL, cuda)."""
    env = {**SUBPROCESS_ENV, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else SUBPROCESS_ENV
    overrides = [*NO_EVAL, *toy_overrides(toy, out, **extra)]
    result = subprocess.run(torchrun_command(1, ["-m", "mpo_dist.train", "--config", str(TRAIN_CONFIG), *overrides]),
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    assert f"on 1 x {device}" in result.stdout  # the device the run really used
    return result


# What the GPU path exercises: bf16 compute with float32 master weights, recomputed activations, packed rows.
GPU_LIKE = {"model.dtype": "bfloat16", "parallel.activation_checkpointing": "true", "data.packing": "always",
            "training.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 2}


@pytest.fixture(scope="module")
def eager_runs(toy_inputs, tmp_path_factory):
    """device -> the folder of one uninterrupted GPU_LIKE run of 4 steps on it (shared by the resume and compile tests)."""
    runs = {}

    def run(device: str) -> Path:
        if device not in runs:
            out = tmp_path_factory.mktemp(f"eager-{device}") / "run"
            train_on(device, toy_inputs, out, **GPU_LIKE)
            runs[device] = out
        return runs[device]

    return run


@pytest.mark.e2e
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_packed_recomputed_training_resumes_like_uninterrupted_and_converts(device, toy_inputs, eager_runs, tmp_path):
    """bf16 + recomputation + packing: resumed at step 2 = uninterrupted; the final checkpoint converts to its weights."""
    full = eager_runs(device)
    assert [r["step"] for r in read_metrics(full)] == [1, 2, 3, 4]
    # "Stopped at step 2": a run folder holding only the step-2 checkpoint, resumed with checkpoint.resume=auto.
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000002", cut / "checkpoints" / "step-00000002")
    resumed = train_on(device, toy_inputs, cut, **GPU_LIKE)
    assert "resumed from" in resumed.stdout and [r["step"] for r in read_metrics(cut)] == [3, 4]
    full_loss, cut_loss = [r["loss/total"] for r in read_metrics(full)[2:]], [r["loss/total"] for r in read_metrics(cut)]
    full_state = flat_checkpoint(full / "checkpoints" / "step-00000004", tmp_path)
    cut_state = flat_checkpoint(cut / "checkpoints" / "step-00000004", tmp_path)
    prefix = MODEL_PREFIX
    weights = {key[len(prefix):]: value for key, value in full_state.items() if key.startswith(prefix)}
    assert len(weights) > 5 and all(v.dtype == torch.float32 for v in weights.values())  # float32 master weights
    if device == "cpu":  # CPU kernels are deterministic: the resumed run is the uninterrupted one, bitwise
        assert cut_loss == full_loss
        for name, value in weights.items():
            assert torch.equal(cut_state[prefix + name], value), name
    else:  # CUDA kernels with atomic adds (index_add in the log-prob sums, SDPA's backward) round differently run to run
        assert cut_loss == pytest.approx(full_loss, rel=1e-3)
        for name, value in weights.items():
            torch.testing.assert_close(cut_state[prefix + name], value, rtol=1e-3, atol=1e-5, msg=name)

    converted = run_tool("convert_checkpoint.py", "--checkpoint", full / "checkpoints" / "step-00000004",
                         "--out", tmp_path / "hf", "--dtype", "float32")
    assert converted.returncode == 0, converted.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    loaded = hf.state_dict()
    assert set(weights) <= set(loaded)
    for name, value in weights.items():  # the trained float32 weights, unchanged
        assert torch.equal(loaded[name], value), name
    start = AutoModelForCausalLM.from_pretrained(str(toy_inputs["model"])).state_dict()
    assert any(not torch.equal(start[name], value) for name, value in weights.items())  # and they were trained


# Not bitwise: inductor fuses each layer's elementwise ops and keeps their intermediates in float32 where eager
# rounds every op's output to bf16, so the compiled layers' numbers differ by bf16 rounding (on CPU: losses and
# gradient norms by 3e-4 relative). The reward margin starts at 0 (the policy is the reference) and grows to
# ~0.3 in 4 steps, so it is compared absolutely (5e-4 apart on CPU at step 1).
COMPILED_TOLERANCE = {"loss/total": {"rel": 2e-3}, "optim/grad_norm": {"rel": 2e-3}, "reward/margin": {"abs": 5e-3}}


@pytest.mark.e2e
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_layers_train_like_eager(device, toy_inputs, eager_runs, tmp_path):
    """parallel.compile=true (inductor: C++ on CPU, Triton on CUDA) logs the eager run's losses, gradient norms, margins."""
    compiled = tmp_path / "compiled"
    train_on(device, toy_inputs, compiled, **GPU_LIKE, **{"parallel.compile": "true"})
    eager = eager_runs(device)
    for name, tolerance in COMPILED_TOLERANCE.items():
        assert [r[name] for r in read_metrics(compiled)] == pytest.approx([r[name] for r in read_metrics(eager)], **tolerance), name


# CUDA only: with the CPU as the compute device the offload policy moves nothing (tests/test_train.py checks that
# offload run there: resumed bitwise, and bitwise equal to the run without offload).
@pytest.mark.e2e
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_GPU)
def test_cpu_offload_resumes_and_holds_less_on_the_device(toy_inputs, eager_runs, tmp_path):
    """parallel.cpu_offload=true: float32 parameters, gradients and AdamW state live in pinned host memory and the
    optimizer steps on the CPU. Resumed at step 2 it ends where the uninterrupted offload run ends (to the resume
    test's CUDA tolerance: atomic adds); against the run without offload its losses agree to rounding (AdamW on the
    CPU rounds otherwise than on the GPU) and its device peak is lower by at least the float32 parameters and the
    two Adam moments, 12 bytes a parameter, which it no longer holds there."""
    offload = {**GPU_LIKE, "parallel.cpu_offload": "true"}
    full = tmp_path / "full"
    train_on("cuda", toy_inputs, full, **offload)
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000002", cut / "checkpoints" / "step-00000002")
    resumed = train_on("cuda", toy_inputs, cut, **offload)
    assert "resumed from" in resumed.stdout and [r["step"] for r in read_metrics(cut)] == [3, 4]
    full_state = flat_checkpoint(full / "checkpoints" / "step-00000004", tmp_path)
    cut_state = flat_checkpoint(cut / "checkpoints" / "step-00000004", tmp_path)
    weights = [key for key in full_state if key.startswith(MODEL_PREFIX)]
    assert len(weights) > 5
    for key in weights:
        torch.testing.assert_close(cut_state[key], full_state[key], rtol=1e-3, atol=1e-5, msg=key)
    full_loss = [r["loss/total"] for r in read_metrics(full)]
    assert [r["loss/total"] for r in read_metrics(cut)] == pytest.approx(full_loss[2:], rel=1e-3)
    eager = read_metrics(eager_runs("cuda"))
    assert full_loss == pytest.approx([r["loss/total"] for r in eager], rel=1e-3)
    parameters = AutoModelForCausalLM.from_pretrained(str(toy_inputs["model"])).num_parameters()
    peak_offload, peak_eager = read_metrics(full)[-1]["memory/peak_gib"], eager[-1]["memory/peak_gib"]
    assert peak_offload <= peak_eager - 12 * parameters / 2**30, (peak_offload, peak_eager, parameters)


@pytest.mark.e2e
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_GPU)
def test_cpu_offload_starts_from_the_random_init_of_the_run_without_it(toy_inputs, tmp_path):
    """A random-init model (model.config) under parallel.cpu_offload is drawn on the GPU and then moved to the host
    (drawn there, DTensor's random ops would not split the stream over shards): its first step logs the loss,
    margin and gradient norm of the run without offload, to rounding."""
    llama = ("{model_type: llama, vocab_size: 16, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
             "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}")
    first = {}
    for name, extra in {"plain": {}, "offload": {"parallel.cpu_offload": "true"}}.items():
        train_on("cuda", toy_inputs, tmp_path / name, **{"model.path": "", "model.config": llama, "training.steps": 1,
                                                         **extra})
        first[name] = read_metrics(tmp_path / name)[0]
    for metric in ("loss/total", "reward/margin", "optim/grad_norm"):
        assert first["offload"][metric] == pytest.approx(first["plain"][metric], rel=1e-3, abs=1e-6), metric
