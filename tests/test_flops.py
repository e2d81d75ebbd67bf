"""The one cost model (mpo_dist/flops.py): a small Llama's sizes counted by hand, the FLOPs of padded
and packed forwards, peak TFLOP/s and MFU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpo_dist import flops
from mpo_dist.batch import pair_documents, single_documents
from mpo_dist.data.layout import lay_out
from mpo_dist.flops import CostModel, peak_tflops
from mpo_dist.model import count_parameters

pytestmark = pytest.mark.unit

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 192, 2, 4, 2, 100


def small_llama(tie_word_embeddings: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config)


def hand_count_of_body_weights() -> int:
    """Every weight of a Llama's body that a token's matmuls use, from the shapes (no biases in
    Llama): the layers and the final norm; not the embedding lookup, not the output head."""
    kv = HIDDEN // HEADS * KV_HEADS  # grouped-query attention: k and v project to fewer heads
    attention = HIDDEN * HIDDEN + 2 * HIDDEN * kv + HIDDEN * HIDDEN  # q, k, v, o
    mlp = 3 * HIDDEN * INTERMEDIATE  # gate, up, down
    norms = 2 * HIDDEN  # two RMSNorms per layer
    return LAYERS * (attention + mlp + norms) + HIDDEN  # + the final norm


@pytest.mark.parametrize("tied", [False, True])
def test_the_cost_model_of_a_small_llama_counts_its_weights(tied):
    model = small_llama(tied)
    cost = CostModel.of(model)
    assert cost == CostModel(body_params=hand_count_of_body_weights(), head_params=VOCAB * HIDDEN, layers=LAYERS,
                             hidden=HIDDEN)
    # A tied head is the embedding matrix: its matmul still runs, once per predicted position.
    assert count_parameters(model) == cost.body_params + cost.head_params + (0 if tied else VOCAB * HIDDEN)


def test_layout_cost_is_body_and_attention_halved_without_a_mask():
    cost = CostModel(body_params=1000, head_params=500, layers=2, hidden=8)
    # 3 rows of 40 positions: 6N per position, attention 12 x layers x hidden x width under a mask.
    assert cost.layout_cost(3, 40, dense_attention=True) == 120 * (6 * 1000 + 12 * 2 * 8 * 40)
    assert cost.layout_cost(3, 40, dense_attention=False) == 120 * (6 * 1000 + 6 * 2 * 8 * 40)


def random_ids(rng, *lengths):
    return [rng.integers(1, VOCAB, size=n) for n in lengths]


def test_training_flops_count_every_position_and_the_head_where_a_token_is_predicted():
    cost = CostModel(body_params=1000, head_params=500, layers=2, hidden=8)
    rng = np.random.default_rng(0)
    # Two pairs of equal lengths (5 + 4 + 4): padded rows of 9 without padding, causal without a mask.
    even = pair_documents(random_ids(rng, 5, 5), random_ids(rng, 4, 4), random_ids(rng, 4, 4))
    padded = lay_out(even, packing="never", pad_token_id=0, cost=cost.layout_cost)
    assert padded.input_ids.shape == (4, 9) and not padded.dense_attention
    assert len(padded.targets) == 16  # every response token has a predictor: the prompt's last token or the one before
    assert cost.training_flops(padded) == 4 * 9 * (6 * 1000 + 6 * 2 * 8 * 9) + 6 * 500 * 16
    # Packed, each pair's prompt once: one segment of 13 per pair, under the 4-D mask (full width).
    packed = lay_out(even, packing="always", pad_token_id=0, cost=cost.layout_cost, pack_tokens=13)
    assert packed.input_ids.shape == (2, 13) and packed.dense_attention
    assert cost.training_flops(packed) == 2 * 13 * (6 * 1000 + 12 * 2 * 8 * 13) + 6 * 500 * 16
    # A D_ref sample of another length: padded rows now hold padding, so the attention runs under a mask.
    uneven = even + single_documents(random_ids(rng, 3), random_ids(rng, 2), first_index=4)
    padded = lay_out(uneven, packing="never", pad_token_id=0, cost=cost.layout_cost)
    assert padded.input_ids.shape == (5, 9) and padded.dense_attention
    assert cost.training_flops(padded) == 5 * 9 * (6 * 1000 + 12 * 2 * 8 * 9) + 6 * 500 * 18



def test_varlen_rows_count_the_pairs_of_their_pieces_whatever_the_row_width():
    cost = CostModel(body_params=1000, head_params=500, layers=2, hidden=8)
    rng = np.random.default_rng(1)
    # Two pairs (prompt 5, responses 4 and 3) and a D_ref sample (prompt 3, response 2), packed in rows of 32.
    documents = (pair_documents(random_ids(rng, 5, 5), random_ids(rng, 4, 4), random_ids(rng, 3, 3))
                 + single_documents(random_ids(rng, 3), random_ids(rng, 2), first_index=4))
    packed = lay_out(documents, packing="always", pad_token_id=0, cost=cost.layout_cost, pack_tokens=32, varlen=True)
    # By hand: [prompt + chosen] is causal (9 x 10 / 2 pairs); the rejected's 3 queries see the prompt's
    # 5 keys and themselves causally (3 x 8 - 3 x 2 / 2); the D_ref sample is one causal piece of 5.
    pairs = 2 * (9 * 10 // 2 + (3 * 8 - 3)) + 5 * 6 // 2
    assert packed.varlen.attended_pairs == pairs
    rows, width = packed.input_ids.shape
    assert cost.training_flops(packed) == rows * width * 6 * 1000 + 12 * 2 * 8 * pairs + 6 * 500 * len(packed.targets)
    # The dense mask's count of the same rows is width-bound; varlen's is not.
    dense = lay_out(documents, packing="always", pad_token_id=0, cost=cost.layout_cost, pack_tokens=32)
    assert cost.training_flops(dense) == rows * width * (6 * 1000 + 12 * 2 * 8 * width) + 6 * 500 * len(packed.targets)
    # Choosing the row length: under the dense mask, attention grows with the width, so rows of the
    # longest document (3 x 12) win; under varlen only the positions count, so 2 rows of 17 (12 + 5, 12) do.
    chosen = {varlen: lay_out(documents, packing="always", pad_token_id=0, cost=cost.layout_cost, varlen=varlen)
              for varlen in (False, True)}
    assert chosen[False].input_ids.shape == (3, 12) and chosen[True].input_ids.shape == (2, 17)
    assert chosen[True].varlen.attended_pairs == pairs

def test_peak_tflops_configured_known_device_or_none(monkeypatch):
    assert peak_tflops(123.0, torch.device("cpu")) == 123.0  # a configured value always wins
    assert peak_tflops(123.0, torch.device("cuda", 0)) == 123.0
    assert peak_tflops(0.0, torch.device("cpu")) is None  # CPU: no MFU unless configured
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(0.0, torch.device("cuda", 0)) == flops.KNOWN_PEAK_TFLOPS["H100"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Unknown GPU")
    assert peak_tflops(0.0, torch.device("cuda", 0)) is None


def test_known_gpu_peaks_tell_the_h100_variants_apart():
    # The PCIe card's name also contains "H100": its own, lower peak must come first.
    assert flops.known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.known_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.known_peak_tflops("NVIDIA H200") == flops.known_peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert flops.known_peak_tflops("Tesla T4") is None


def test_mfu_arithmetic():
    # 1e13 FLOPs in 2 s on 4 devices = 1.25e12 FLOP/s each, of a 100 TFLOP/s peak.
    assert flops.mfu(1e13, 2.0, 4, 100.0) == pytest.approx(0.0125)
