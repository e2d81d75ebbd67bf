"""varlen.py: the attention pieces of packed rows (varlen_attn's cu_seq_q/cu_seq_k and a key gather),
run by the CPU twin, give SDPA under the dense packed mask (logprobs.packed_attention_mask), values
and gradients, for pairs packed several to a row with D_ref samples, padding and GQA; and the check
fails when the prompt gather or the causal alignment is off."""

import dataclasses

import numpy as np
import pytest
import torch

from mpo_dist.batch import pair_documents, single_documents
from mpo_dist.data.layout import Document, lay_out
from mpo_dist.logprobs import packed_attention_mask
from mpo_dist.varlen import VarlenDescriptors, causal_piece_mask, varlen_attention, varlen_attention_reference

pytestmark = pytest.mark.unit

# fp32: outputs and gradients of the pieces equal the dense-mask SDPA to 1e-5 (same math, other
# summation order; softmax over at most ~70 keys of unit-scale scores).
TOLERANCE = dict(rtol=0, atol=1e-5)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def flat_cost(rows: int, width: int, dense: bool) -> float:
    """A stand-in for flops.CostModel.layout_cost: per-position work plus attention over the width."""
    return rows * width * (64 + width)


def documents(seed: int = 0, pairs: int = 6, dref: int = 3) -> list[Document]:
    """Pairs of various lengths (one with an empty prompt) and D_ref samples after them."""
    rng = np.random.default_rng(seed)
    ids = lambda low, high: rng.integers(1, 97, size=int(rng.integers(low, high)))  # noqa: E731
    prompts = [ids(1, 12) for _ in range(pairs)]
    prompts[1] = np.zeros(0, np.int64)
    docs = pair_documents(prompts, [ids(1, 14) for _ in range(pairs)], [ids(1, 14) for _ in range(pairs)])
    return docs + single_documents([ids(1, 10) for _ in range(dref)], [ids(1, 14) for _ in range(dref)],
                                   first_index=2 * pairs)


LAYOUTS = {
    "packed, several pairs a row": dict(packing="always", pack_tokens=64),
    "packed, row length by cost, padded to 8": dict(packing="always", pad_to_multiple_of=8),
    "packed, shapes bucketed (rows of padding)": dict(packing="always", pack_tokens=40, bucket_shapes=True),
    "padded left": dict(packing="never", padding_side="left"),
}


def layout(name: str, seed: int = 0):
    return lay_out(documents(seed), pad_token_id=0, cost=flat_cost, **LAYOUTS[name])


def dense_reference(query, key, value, inputs) -> torch.Tensor:
    """What the model computes today: SDPA under the packed 4-D mask (or the padded rows' causal
    mask), kv heads repeated; -> [rows, width, heads, dim]."""
    if inputs.packed:
        mask = packed_attention_mask(inputs.segment_ids, inputs.branch_ids, "sdpa", query.dtype)
    else:
        width = inputs.attention_mask.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = (causal[None] & inputs.attention_mask[:, None, :])[:, None]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)


def random_qkv(inputs, seed: int = 1):
    rows, width = inputs.input_ids.shape
    generator = torch.Generator().manual_seed(seed)
    make = lambda heads: torch.randn(rows, heads, width, HEAD_DIM, generator=generator, requires_grad=True)  # noqa: E731
    return make(HEADS), make(KV_HEADS), make(KV_HEADS)


def outputs_and_grads(attention, query, key, value, real, seed: int = 2):
    """Attention output at the real positions and the gradients of a random weighting of it."""
    out = attention(query, key, value)
    weight = torch.randn(out[real].shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((out[real] * weight).sum(), (query, key, value))
    return out, grads


def piece_mask(descriptors: VarlenDescriptors, alignment: str = "bottom_right") -> torch.Tensor:
    """The [rows*width, rows*width] mask the pieces imply, in flat positions."""
    size = descriptors.rows * descriptors.width
    mask = torch.zeros(size, size, dtype=torch.bool)
    cq, ck = descriptors.cu_seq_q.tolist(), descriptors.cu_seq_k.tolist()
    for p in range(descriptors.num_pieces):
        queries = descriptors.query_index[cq[p] : cq[p + 1]]
        keys = descriptors.key_index[ck[p] : ck[p + 1]]
        sees = causal_piece_mask(len(queries), len(keys), alignment)
        mask[queries[:, None], keys[None, :]] |= sees
    return mask


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pieces_imply_the_dense_mask_at_real_positions(name):
    inputs = layout(name)
    descriptors = VarlenDescriptors.of(inputs)
    rows, width = inputs.input_ids.shape
    real = inputs.attention_mask.reshape(-1)
    if inputs.packed:
        dense = packed_attention_mask(inputs.segment_ids, inputs.branch_ids, "sdpa", torch.float32)[:, 0]
        flat_dense = torch.zeros(rows * width, rows * width, dtype=torch.bool)
        for row in range(rows):
            span = slice(row * width, (row + 1) * width)
            flat_dense[span, span] = dense[row]
    else:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        flat_dense = torch.block_diag(*[causal & inputs.attention_mask[row][None, :] for row in range(rows)])
    implied = piece_mask(descriptors)
    assert torch.equal(implied[real][:, real], flat_dense[real][:, real])
    assert not implied[:, ~real].any() and not implied[~real].any()  # padding: in no piece
    assert torch.equal(descriptors.query_index, real.nonzero().squeeze(-1))
    lengths_q, lengths_k = descriptors.cu_seq_q.diff(), descriptors.cu_seq_k.diff()
    assert (descriptors.max_q, descriptors.max_k) == (int(lengths_q.max()), int(lengths_k.max()))
    assert descriptors.cu_seq_q.dtype == descriptors.cu_seq_k.dtype == torch.int32


def test_pieces_of_a_packed_row():
    """One row by hand: a pair [p p p][c c][r r r r] then a D_ref sample [p p][s], padding to 12."""
    pair = Document(np.array([5, 6, 7]), [(0, np.array([8, 9])), (1, np.array([10, 11, 12, 13]))])
    sample = Document(np.array([14, 15]), [(2, np.array([16]))])
    inputs = lay_out([pair, sample], packing="always", pad_token_id=0, cost=flat_cost, pack_tokens=12,
                     pad_to_multiple_of=12)
    d = VarlenDescriptors.of(inputs)
    assert inputs.input_ids.shape == (1, 12)
    assert d.cu_seq_q.tolist() == [0, 5, 9, 12]  # [prompt][chosen], [rejected], [prompt][sample]
    assert d.cu_seq_k.tolist() == [0, 5, 12, 15]  # the rejected's keys: prompt (3) + itself (4)
    assert d.key_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 9, 10, 11]
    assert (d.max_q, d.max_k) == (5, 7)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reference_equals_dense_mask_values_and_gradients(name):
    inputs = layout(name)
    assert inputs.packed == (LAYOUTS[name]["packing"] == "always")
    if inputs.packed:  # several documents share a row, and some rows hold a rejected response
        assert (inputs.segment_ids.amax(-1) >= 1).any() and (inputs.branch_ids == 2).any()
    descriptors = VarlenDescriptors.of(inputs)
    real = inputs.attention_mask
    query, key, value = random_qkv(inputs)
    want, want_grads = outputs_and_grads(lambda q, k, v: dense_reference(q, k, v, inputs), query, key, value, real)
    got, got_grads = outputs_and_grads(lambda q, k, v: varlen_attention_reference(q, k, v, descriptors),
                                       query, key, value, real)
    assert got.shape == want.shape == (*real.shape, HEADS, HEAD_DIM) and got.dtype == want.dtype
    torch.testing.assert_close(got[real], want[real], **TOLERANCE)
    assert not got[~real].any()  # padding: zero
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, **TOLERANCE)
    # The dispatching entry takes the reference off CUDA.
    torch.testing.assert_close(varlen_attention(query, key, value, descriptors), got, rtol=0, atol=0)


def test_scale_is_passed_through():
    inputs = layout("packed, several pairs a row")
    descriptors = VarlenDescriptors.of(inputs)
    query, key, value = random_qkv(inputs)
    real = inputs.attention_mask
    with torch.no_grad():
        scaled = varlen_attention_reference(query * 0.5, key, value, descriptors)
        explicit = varlen_attention_reference(query, key, value, descriptors, scale=0.5 / HEAD_DIM ** 0.5)
    torch.testing.assert_close(scaled[real], explicit[real], **TOLERANCE)


def shifted_prompt_gather(descriptors: VarlenDescriptors, shift: int) -> VarlenDescriptors:
    """The descriptors with every further response's prompt keys gathered `shift` positions off."""
    key_index = descriptors.key_index.clone()
    cq, ck = descriptors.cu_seq_q.tolist(), descriptors.cu_seq_k.tolist()
    for p in range(descriptors.num_pieces):
        prompt_keys = (ck[p + 1] - ck[p]) - (cq[p + 1] - cq[p])
        key_index[ck[p] : ck[p] + prompt_keys] += shift
    key_index.clamp_(0, descriptors.rows * descriptors.width - 1)  # a prompt at flat position 0, shifted back
    assert not torch.equal(key_index, descriptors.key_index)
    return dataclasses.replace(descriptors, key_index=key_index)


@pytest.mark.parametrize("wrong", ["prompt gather one later", "prompt gather one earlier", "top-left alignment"])
def test_the_check_fails_when_gather_or_alignment_is_off(wrong):
    """The equality above has teeth: each deliberate error changes outputs of rejected responses."""
    inputs = layout("packed, several pairs a row")
    descriptors = VarlenDescriptors.of(inputs)
    real = inputs.attention_mask
    query, key, value = random_qkv(inputs)
    alignment = "top_left" if wrong == "top-left alignment" else "bottom_right"
    if wrong != "top-left alignment":
        descriptors = shifted_prompt_gather(descriptors, 1 if wrong == "prompt gather one later" else -1)
    with torch.no_grad():
        want = dense_reference(query, key, value, inputs)
        got = varlen_attention_reference(query, key, value, descriptors, alignment=alignment)
    rejected = real & (inputs.branch_ids == 2)
    assert not torch.allclose(got[rejected], want[rejected], **TOLERANCE)
    # Only the further responses are off: [prompt][chosen] pieces and D_ref samples stay right.
    others = real & (inputs.branch_ids != 2)
    torch.testing.assert_close(got[others], want[others], **TOLERANCE)
