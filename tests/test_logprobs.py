"""logprobs.py against a naive full log-softmax, with prompt/padding masking and both padding sides."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from mpo_dist.data.collate import pad_sequences
from mpo_dist.logprobs import padded_rows_input, sequence_logprobs, token_logprobs


def tiny_llama(vocab=97):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(config).float().eval()


def tiny_gpt2(vocab=97):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return AutoModelForCausalLM.from_config(config).float().eval()


def random_rows(vocab, count=6, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, vocab, size=rng.integers(1, 9)) for _ in range(count)]
    responses = [rng.integers(1, vocab, size=rng.integers(1, 12)) for _ in range(count)]
    return prompts, responses


def naive_token_logps(model, prompts, responses):
    """Each row alone, unpadded: full logits, full log_softmax; the response tokens' log-probs."""
    rows = []
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor(np.concatenate([prompt, response]))[None]
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        rows.append(logp[len(prompt) - 1 :])
    return rows


def naive_logps(model, prompts, responses):
    return torch.stack([row.sum() for row in naive_token_logps(model, prompts, responses)])


def assert_matches_naive(model, batch, prompts, responses, chunk_tokens):
    """Every response token's log-prob, and their sums (tens to hundreds in size), to float32 rounding: a
    few ulps of the value (a token log-prob of -28 is 1.1e-5 off on an AVX2 CPU, whose kernels round
    otherwise than AMX's), 1e-5 near zero."""
    with torch.no_grad():
        out = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], chunk_tokens)
        inputs = padded_rows_input(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        tokens = token_logprobs(model, inputs, chunk_tokens)
        expected = naive_token_logps(model, prompts, responses)
    for row, want in enumerate(expected):
        got = tokens[inputs.sequence_index == row]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.logps, torch.stack([w.sum() for w in expected]), rtol=1e-6, atol=1e-5)
    assert out.num_tokens.tolist() == [len(r) for r in responses]


@pytest.mark.unit
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("chunk_tokens", [7, 4096])
def test_matches_naive_log_softmax(make_model, side, chunk_tokens):
    model = make_model()
    prompts, responses = random_rows(97)
    batch = pad_sequences(prompts, responses, pad_token_id=3, padding_side=side)
    assert_matches_naive(model, batch, prompts, responses, chunk_tokens)


@pytest.mark.unit
def test_padding_token_and_prompt_masking():
    model = tiny_llama()
    prompts, responses = random_rows(97, seed=1)
    with torch.no_grad():
        a = sequence_logprobs(model, **pad_sequences(prompts, responses, pad_token_id=0))
        b = sequence_logprobs(model, **pad_sequences(prompts, responses, pad_token_id=55, pad_to_multiple_of=16))
        # The same rows with the whole prompt counted give a different (larger in magnitude) sum.
        whole = pad_sequences(prompts, responses, pad_token_id=0)
        whole["response_mask"] = whole["attention_mask"].clone()
        c = sequence_logprobs(model, **whole)
    torch.testing.assert_close(a.logps, b.logps, rtol=0, atol=1e-5)
    assert torch.all(c.logps < a.logps - 1e-3)


@pytest.mark.unit
@pytest.mark.parametrize("keep_logits_bytes", [0, 2**30])
def test_gradients_match_naive(monkeypatch, keep_logits_bytes):
    """With every chunk's head recomputed in the backward (budget 0) and with the logits kept."""
    from mpo_dist import logprobs

    monkeypatch.setattr(logprobs, "KEEP_LOGITS_BYTES", keep_logits_bytes)
    model = tiny_llama()
    prompts, responses = random_rows(97, seed=2)
    batch = pad_sequences(prompts, responses, pad_token_id=0)
    sequence_logprobs(model, chunk_tokens=5, **batch).logps.sum().backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    naive_logps(model, prompts, responses).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.unit
def test_stories260k_real_model(shared_data):
    path = shared_data("stories260K")
    model = AutoModelForCausalLM.from_pretrained(str(path)).float().eval()
    prompts, responses = random_rows(512, seed=3)
    for side in ("right", "left"):
        batch = pad_sequences(prompts, responses, pad_token_id=2, padding_side=side)
        assert_matches_naive(model, batch, prompts, responses, chunk_tokens=16)


def bench_peak_increases(*runs: tuple[str, int]) -> list[int]:
    """Variants of tools/bench_logprobs_memory.py as (variant, batch), each run as its own process (as
    the tool runs each), all at once: each measures its own process's peak, whatever runs beside it."""
    import json
    import subprocess
    import sys

    from support import REPO, SUBPROCESS_ENV

    jobs = [subprocess.Popen([sys.executable, str(REPO / "tools" / "bench_logprobs_memory.py"), "--variant", variant,
                              "--vocab", "50257", "--batch", str(batch), "--length", "512", "--chunk-tokens", "256",
                              "--device", "cpu"], env=SUBPROCESS_ENV, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for variant, batch in runs]
    peaks = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stderr[-3000:]
        peaks.append(json.loads(stdout.strip().splitlines()[-1])["peak_increase_bytes"])
    return peaks


@pytest.mark.e2e
def test_chunked_peak_memory_is_bounded_and_below_naive():
    """Measured peak memory (forward + backward, fresh processes): the chunked path's peak does
    not grow with the batch, the naive full log-softmax's does."""
    # Two at a time (CI has two cores), the largest (naive, 8: ~3.5 GiB) beside a small one.
    naive_large, chunked_small = bench_peak_increases(("naive", 8), ("chunked", 4))
    naive_small, chunked_large = bench_peak_increases(("naive", 4), ("chunked", 8))
    logits_small = 4 * 512 * 50257 * 4
    assert naive_small > logits_small and naive_large > 1.8 * naive_small  # grows with batch x length
    assert chunked_small < naive_small / 4 and chunked_large < 1.3 * chunked_small  # a few chunks' worth


@pytest.mark.unit
def test_architectures_that_rescale_logits_match_their_own_forward():
    """Granite divides the logits by logits_scaling, Gemma 2 soft-caps them: as their forward does."""
    from transformers import Gemma2Config, GraniteConfig

    configs = [GraniteConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0),
               Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0)]
    for config in configs:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float().eval()
        prompts, responses = random_rows(97, seed=4)
        assert_matches_naive(model, pad_sequences(prompts, responses, pad_token_id=0), prompts, responses, chunk_tokens=9)
