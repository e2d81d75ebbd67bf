"""Throughput arithmetic: training FLOPs per token of a small Llama counted by hand, peak TFLOP/s, MFU."""

from __future__ import annotations

import pytest
import torch

from mpo_dist import metrics
from mpo_dist.model import count_parameters
from mpo_dist.metrics import flops_per_token, peak_tflops

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 192, 2, 4, 2, 100


def small_llama(tie_word_embeddings: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config)


def hand_count_of_matmul_weights() -> int:
    """Every weight of a Llama that a token's matmuls use, from the shapes (no biases in Llama): all
    but the input embedding lookup. A tied head is the embedding matrix, and its matmul runs too."""
    kv = HIDDEN // HEADS * KV_HEADS  # grouped-query attention: k and v project to fewer heads
    attention = HIDDEN * HIDDEN + 2 * HIDDEN * kv + HIDDEN * HIDDEN  # q, k, v, o
    mlp = 3 * HIDDEN * INTERMEDIATE  # gate, up, down
    norms = 2 * HIDDEN  # two RMSNorms per layer
    head = VOCAB * HIDDEN
    return LAYERS * (attention + mlp + norms) + HIDDEN + head  # + the final norm


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_of_a_small_llama(tied):
    model = small_llama(tied)
    n = count_parameters(model, exclude_embeddings=True)  # what the trainer's MFU counts
    assert n == hand_count_of_matmul_weights()
    assert count_parameters(model) == n + (0 if tied else VOCAB * HIDDEN)
    seq_len = 48
    expected = 6 * n + 12 * LAYERS * HIDDEN * seq_len
    assert flops_per_token(n, LAYERS, HIDDEN, seq_len) == expected
    # 3 rows of 40 positions (padded or packed: every position is computed): 120 tokens at length 40.
    assert metrics.row_flops(n, LAYERS, HIDDEN, 3, 40) == 120 * (6 * n + 12 * LAYERS * HIDDEN * 40)


def test_peak_tflops_configured_known_device_or_none(monkeypatch):
    assert peak_tflops(123.0, torch.device("cpu")) == 123.0  # a configured value always wins
    assert peak_tflops(123.0, torch.device("cuda", 0)) == 123.0
    assert peak_tflops(0.0, torch.device("cpu")) is None  # CPU: no MFU unless configured
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(0.0, torch.device("cuda", 0)) == metrics.KNOWN_PEAK_TFLOPS["H100"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Unknown GPU")
    assert peak_tflops(0.0, torch.device("cuda", 0)) is None


def test_known_gpu_peaks_tell_the_h100_variants_apart():
    # The PCIe card's name also contains "H100": its own, lower peak must come first.
    assert metrics.known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert metrics.known_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert metrics.known_peak_tflops("NVIDIA H200") == metrics.known_peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert metrics.known_peak_tflops("Tesla T4") is None


def test_mfu_arithmetic():
    # 1e13 FLOPs in 2 s on 4 devices = 1.25e12 FLOP/s each, of a 100 TFLOP/s peak.
    assert metrics.mfu(1e13, 2.0, 4, 100.0) == pytest.approx(0.0125)
