"""flex.py (model.attention=flex): FlexAttention's mask function of packed rows equals the dense packed
mask (logprobs.packed_attention_mask) element by element at every real query, with several pairs a
row, D_ref samples, padding and rows of padding, and the block mask built from it skips exactly the
empty tiles; the comparison catches a wrong mask; the flex forward (eager on CPU) gives the dense
path's attention outputs and per-token log-probs for Llama, Qwen2 (GQA) and GPT-2, also bucketed
and under FSDP; and what it cannot serve is refused."""

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from support import packed_micro_batch, tiny_causal_lm
from mpo_dist.attention import packed_attention_forward, resolve_attention, use_packed_attention
from mpo_dist.batch import pair_documents, single_documents
from mpo_dist.data.layout import PAD_SEGMENT, lay_out
from mpo_dist.errors import InputError
from mpo_dist.flex import FLEX_BLOCK, FlexMask, build_flex_mask, flex_attention_packed, flex_shape, packed_mask_mod
from mpo_dist.logprobs import LOGPROB_METHOD, packed_attention_mask

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

# fp32: flex (unfused on CPU) and SDPA under the dense mask compute the same softmax in another
# summation order; attention outputs of unit-scale inputs and per-token log-probs (magnitude ~5)
# agree to a few float32 ulps, well inside 1e-5.
TOLERANCE = dict(rtol=0, atol=1e-5)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def documents(seed: int = 0, pairs: int = 14, dref: int = 4, longest: int = 30):
    """Pairs of various lengths (one with an empty prompt) and D_ref samples after them; prompts and
    responses of up to `longest` tokens."""
    rng = np.random.default_rng(seed)
    ids = lambda low, high: rng.integers(1, 97, size=int(rng.integers(low, high)))  # noqa: E731
    prompts = [ids(1, longest) for _ in range(pairs)]
    prompts[1] = np.zeros(0, np.int64)
    docs = pair_documents(prompts, [ids(1, longest) for _ in range(pairs)], [ids(1, longest) for _ in range(pairs)])
    return docs + single_documents([ids(1, longest) for _ in range(dref)], [ids(1, longest) for _ in range(dref)],
                                   first_index=2 * pairs)


LAYOUTS = {  # name: (documents' options, lay_out's options); rows over 128 positions: several tiles a row
    "several pairs a row": ({}, dict(pack_tokens=200)),
    "padded to 8": ({}, dict(pack_tokens=150, pad_to_multiple_of=8)),
    "shapes bucketed": ({}, dict(pack_tokens=170, bucket_shapes=True)),
    "21 rows (flex buckets them to 24)": (dict(pairs=19, longest=70), {}),
    "24 rows, bucketed (3 rows of padding)": (dict(pairs=19, longest=70), dict(bucket_shapes=True)),
}


def layout(name: str):
    document_options, layout_options = LAYOUTS[name]
    inputs = lay_out(documents(**document_options), packing="always", pad_token_id=0,
                     cost=lambda rows, width, dense, attended_pairs=None: rows * width * (64 + width), **layout_options)
    assert inputs.packed and inputs.input_ids.shape[1] > FLEX_BLOCK
    assert (inputs.branch_ids == 2).any() and not inputs.attention_mask.all()  # rejected responses and padding
    return inputs


def element_mask(mask_mod, rows: int, width: int) -> torch.Tensor:
    """[rows, width (queries), width (keys)] bool: `mask_mod` at every pair, as FlexAttention evaluates it."""
    return create_mask(mask_mod, rows, None, width, width, device="cpu")[:, 0]


def differences(allowed: torch.Tensor, inputs) -> int:
    """Pairs where `allowed` (the flex mask element by element, over the layout's shape or a larger
    one) differs from what the flex path must compute: the dense packed mask at real queries;
    nothing at padding queries (the dense mask lets padding see padding) or beyond the layout."""
    rows, width = inputs.segment_ids.shape
    dense = packed_attention_mask(inputs.segment_ids, inputs.branch_ids, "sdpa", torch.float32)[:, 0]
    want = torch.zeros_like(allowed)
    want[:rows, :width, :width] = dense & inputs.attention_mask[:, :, None]
    return int((allowed != want).sum())


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_mask_function_is_the_dense_mask_at_every_real_query(name):
    inputs = layout(name)
    rows, width = inputs.segment_ids.shape
    allowed = element_mask(packed_mask_mod(inputs.segment_ids, inputs.branch_ids), rows, width)
    assert differences(allowed, inputs) == 0
    real = inputs.attention_mask
    dense = packed_attention_mask(inputs.segment_ids, inputs.branch_ids, "sdpa", torch.float32)[:, 0]
    assert torch.equal(allowed[real], dense[real])  # the same statement, spelled out
    assert not allowed[~real].any() and dense[~real].any()  # padding queries: nothing here, padding there


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("name", LAYOUTS)
def test_the_block_mask_holds_that_mask_and_skips_empty_tiles(name, bucket):
    inputs = layout(name)
    rows, width = inputs.segment_ids.shape
    mask = build_flex_mask(inputs.segment_ids, inputs.branch_ids, bucket=bucket)
    assert (mask.rows, mask.width) == (rows, width) and (mask.flex_rows, mask.flex_width) == flex_shape(rows, width, bucket)
    if bucket:
        assert mask.flex_width % FLEX_BLOCK == 0 and mask.flex_width > width
    allowed = element_mask(mask.block_mask.mask_mod, mask.flex_rows, mask.flex_width)
    assert differences(allowed, inputs) == 0
    # Tile by tile: a tile is listed exactly when it holds an allowed pair (the kernel skips the rest).
    tiles = -(-mask.flex_width // FLEX_BLOCK)
    padded = torch.zeros(mask.flex_rows, tiles * FLEX_BLOCK, tiles * FLEX_BLOCK, dtype=torch.bool)
    padded[:, : mask.flex_width, : mask.flex_width] = allowed
    occupied = padded.view(mask.flex_rows, tiles, FLEX_BLOCK, tiles, FLEX_BLOCK).any(4).any(2)
    assert torch.equal(mask.block_mask.to_dense()[:, 0].bool(), occupied)
    padding_rows = torch.cat([(~inputs.attention_mask).all(-1), torch.ones(mask.flex_rows - rows, dtype=torch.bool)])
    assert not occupied[padding_rows].any()  # rows of padding (the layout's, flex's bucket) cost the kernel nothing


def wrong_mask(kind: str):
    def make(segment_ids, branch_ids):
        def mask_mod(b, h, q_idx, kv_idx):
            segment, branch = segment_ids[b, kv_idx], branch_ids[b, kv_idx]
            same = (segment == segment_ids[b, q_idx]) & (segment != PAD_SEGMENT)
            own = (branch == 0) | (branch == branch_ids[b, q_idx])
            if kind == "sees sibling responses":
                return same & (kv_idx <= q_idx)
            if kind == "padding keys seen by padding":
                return (segment == segment_ids[b, q_idx]) & own & (kv_idx <= q_idx)
            return same & own & ((kv_idx < q_idx) if kind == "kv < q" else (kv_idx <= q_idx + 1))
        return mask_mod
    return make


@pytest.mark.parametrize("kind", ["sees sibling responses", "kv < q", "kv <= q + 1", "padding keys seen by padding"])
def test_the_comparison_catches_a_wrong_mask(kind):
    inputs = layout("several pairs a row")
    rows, width = inputs.segment_ids.shape
    allowed = element_mask(wrong_mask(kind)(inputs.segment_ids, inputs.branch_ids), rows, width)
    assert differences(allowed, inputs) > 0


def random_qkv(rows: int, width: int, kv_heads: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    make = lambda heads: torch.randn(rows, heads, width, HEAD_DIM, generator=generator)  # noqa: E731
    return make(HEADS), make(kv_heads), make(kv_heads)


@pytest.mark.parametrize("kv_heads", [HEADS, KV_HEADS])
@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("name", ["21 rows (flex buckets them to 24)", "24 rows, bucketed (3 rows of padding)"])
def test_flex_attention_equals_sdpa_under_the_dense_mask(name, bucket, kv_heads):
    inputs = layout(name)
    rows, width = inputs.segment_ids.shape
    query, key, value = random_qkv(rows, width, kv_heads)
    mask = build_flex_mask(inputs.segment_ids, inputs.branch_ids, bucket=bucket)
    got = flex_attention_packed(query, key, value, mask, scale=0.3)
    dense = packed_attention_mask(inputs.segment_ids, inputs.branch_ids, "sdpa", torch.float32)
    groups = HEADS // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1),
                                                            value.repeat_interleave(groups, 1), attn_mask=dense,
                                                            scale=0.3).transpose(1, 2)
    real = inputs.attention_mask
    assert got.shape == (rows, width, HEADS, HEAD_DIM)
    torch.testing.assert_close(got[real], want[real], **TOLERANCE)
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))  # padding: zeros, never NaN
    # The scale is passed through: another scale gives other numbers.
    assert not torch.allclose(flex_attention_packed(query, key, value, mask)[real], got[real], atol=1e-3)
    with pytest.raises(ValueError, match="the flex mask was built for"):
        flex_attention_packed(query[:, :, :-1], key[:, :, :-1], value[:, :, :-1], mask)


def flex_logprobs(model, inputs) -> torch.Tensor:
    """logprobs.token_logprobs, through the model's method (the one FSDP hooks)."""
    with torch.no_grad():
        return getattr(model, LOGPROB_METHOD)(inputs)


@pytest.mark.parametrize("bucket_shapes", [False, True])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_flex_log_probs_equal_the_dense_path(kind, bucket_shapes, monkeypatch):
    import mpo_dist.attention as attention

    inputs = packed_micro_batch(varlen=False, bucket_shapes=bucket_shapes).inputs  # pairs packed with D_ref samples
    assert inputs.packed and (inputs.segment_ids.amax(-1) >= 1).any() and (inputs.branch_ids == 2).any()
    model = tiny_causal_lm(kind)
    want = flex_logprobs(model, inputs)
    calls = []
    real = attention.flex_attention_packed
    monkeypatch.setattr(attention, "flex_attention_packed", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    use_packed_attention(model, "flex")
    got = flex_logprobs(model, inputs)
    assert got.shape == want.shape == inputs.targets.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOLERANCE)
    # Every layer ran flex, all under the one block mask of the micro-batch.
    assert len(calls) == 2 and isinstance(calls[0], FlexMask) and calls[0] is calls[1]
    # Padded rows keep SDPA with their own mask under the flex path.
    padded = packed_micro_batch(varlen=False, packing="never").inputs
    calls.clear()
    use_packed_attention(model, "flex")
    padded_flex = flex_logprobs(model, padded)
    assert not calls
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(padded_flex, flex_logprobs(model, padded), **TOLERANCE)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_flex_forward_under_fsdp(kind, one_process_group, monkeypatch):
    from mpo_dist import attention
    from mpo_dist.config import ParallelConfig
    from mpo_dist.parallelize import apply_fsdp, build_mesh

    calls = []
    real = attention.flex_attention_packed
    monkeypatch.setattr(attention, "flex_attention_packed", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = packed_micro_batch(varlen=False).inputs
    results = []
    for path in ("dense", "flex"):
        model = tiny_causal_lm(kind)  # a fresh model each: FSDP shards it in place
        if path == "flex":
            use_packed_attention(model, "flex")  # before sharding, as the trainer does
        parallel = ParallelConfig(dp_shard=1, activation_checkpointing=True)
        apply_fsdp(model, build_mesh(parallel, 1, "cpu"), parallel, "float32")
        results.append(flex_logprobs(model, inputs))
    assert len(calls) == model.config.num_hidden_layers  # the wrapped model still runs flex, in every layer
    torch.testing.assert_close(results[1], results[0], **TOLERANCE)


def test_refusals():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    llama = tiny_causal_lm("llama").config
    with pytest.raises(InputError, match=r"^model.attention=flex cannot train on CPU: torch has no FlexAttention "
                                         r"backward there \(forward only\); set model.attention=varlen"):
        resolve_attention("flex", cpu, llama, training=True)
    assert resolve_attention("flex", cpu, llama, training=False) == "flex"
    assert resolve_attention("flex", cuda, llama, training=True) == "flex"
    # (sliding windows and soft-capping: tests/test_attention_paths.py, for both packed paths)
    # At run time too: a layer asking for a window, or attention dropout in training.
    model = tiny_causal_lm("llama")
    inputs = packed_micro_batch(varlen=False).inputs
    mask = build_flex_mask(inputs.segment_ids, inputs.branch_ids)
    query = torch.zeros(*inputs.input_ids.shape[:1], HEADS, inputs.input_ids.shape[1], HEAD_DIM)
    layer = model.model.layers[0].self_attn
    with pytest.raises(InputError, match="^model.attention=flex cannot serve sliding_window=8 in LlamaAttention"):
        packed_attention_forward(layer, query, query, query, None, sliding_window=8, packed_attention=mask)
    with pytest.raises(InputError, match=r"^model.attention=flex does not apply attention dropout \(here 0.1\)"):
        packed_attention_forward(layer, query, query, query, None, dropout=0.1, packed_attention=mask)
