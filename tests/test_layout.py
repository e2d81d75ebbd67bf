"""data/layout.py with logprobs.py: packed pairs (prompt shared, rejected blind to chosen) give the
log-probs of each sequence computed alone, for Llama, Qwen2 and GPT-2, as padded rows do."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from mpo_dist.batch import pair_documents, single_documents
from mpo_dist.data.layout import pack_documents, pad_documents
from mpo_dist.errors import InputError
from mpo_dist.logprobs import batch_logprobs, token_logprobs

pytestmark = pytest.mark.unit

VOCAB = 97
# fp32 throughout: per-token log-probs to 2e-5 (sums of tens of tokens to 1e-4).
TOKEN_TOLERANCE = dict(rtol=0, atol=2e-5)
SUM_TOLERANCE = dict(rtol=0, atol=1e-4)


def model_of(kind: str, attention: str = "sdpa"):
    torch.manual_seed(0)
    config = {
        "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                   bos_token_id=1, eos_token_id=2),
    }[kind]()
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).float().eval()


def documents(seed: int = 0, pairs: int = 5, dref: int = 3):
    """`pairs` pairs (sequences chosen 0..P-1, rejected P..2P-1) and `dref` single samples after them."""
    rng = np.random.default_rng(seed)
    ids = lambda low, high: rng.integers(1, VOCAB, size=int(rng.integers(low, high)))  # noqa: E731
    pair_docs = pair_documents([ids(1, 12) for _ in range(pairs)], [ids(1, 14) for _ in range(pairs)],
                               [ids(1, 14) for _ in range(pairs)])
    return pair_docs + single_documents([ids(1, 10) for _ in range(dref)], [ids(1, 14) for _ in range(dref)],
                                        first_index=2 * pairs)


def alone(model, docs) -> dict[int, torch.Tensor]:
    """Each output sequence computed alone, unpadded, with the model's own forward and a full
    log-softmax: the response tokens' log-probs, by sequence index."""
    out = {}
    for doc in docs:
        for index, response in doc.responses:
            ids = torch.tensor(np.concatenate([doc.prompt, response]))[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            out[index] = logp[len(doc.prompt) - 1 :]
    return out


LAYOUTS = {
    "padded right": lambda docs: pad_documents(docs, 0, "right"),
    "padded left": lambda docs: pad_documents(docs, 5, "left", pad_to_multiple_of=8),
    "packed": lambda docs: pack_documents(docs, 0),
    "packed, one row": lambda docs: pack_documents(docs, 0, pack_tokens=10_000, pad_to_multiple_of=8),
    "packed, a row per document": lambda docs: pack_documents(docs, 0, pack_tokens=1),
    "padded, shapes bucketed": lambda docs: pad_documents(docs, 0, "left", bucket_shapes=True),
    "packed, shapes bucketed": lambda docs: pack_documents(docs, 0, pack_tokens=20, bucket_shapes=True),
}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_each_sequence_computed_alone(kind, layout):
    model, docs = model_of(kind), documents()
    inputs = LAYOUTS[layout](docs)
    with torch.no_grad():
        tokens = token_logprobs(model, inputs, chunk_tokens=7)
        sums = batch_logprobs(model, inputs)
    expected = alone(model, docs)
    assert inputs.num_sequences == len(expected) == 13
    for index, want in expected.items():
        torch.testing.assert_close(tokens[inputs.sequence_index == index], want, **TOKEN_TOLERANCE)
        torch.testing.assert_close(sums.logps[index], want.sum(), **SUM_TOLERANCE)
        assert int(sums.num_tokens[index]) == len(want)


def test_packing_shares_the_prompt_and_needs_fewer_positions():
    docs = documents(seed=1)
    padded, packed = pad_documents(docs, 0), pack_documents(docs, 0)
    prompts = sum(len(doc.prompt) * (len(doc.responses) - 1) for doc in docs)
    assert packed.num_tokens == padded.num_tokens  # the same sequences as data
    assert padded.num_real_positions == padded.num_tokens
    assert packed.num_real_positions == padded.num_tokens - prompts  # each pair's prompt computed once
    assert packed.num_positions < padded.num_positions
    # Rows hold whole documents, first-fit decreasing, none longer than the longest document.
    longest = max(doc.length for doc in docs)
    assert packed.input_ids.shape[1] == longest
    segments = packed.segment_ids
    assert sorted(int((segments[row] >= 0).sum()) for row in range(len(segments))) == sorted(
        sum(docs[i].length for i in members) for members in _row_members(docs, longest))


def _row_members(docs, capacity):
    """First-fit decreasing by hand: the documents of each row."""
    rows, used = [], []
    for i in sorted(range(len(docs)), key=lambda i: -docs[i].length):
        for row, filled in enumerate(used):
            if filled + docs[i].length <= capacity:
                rows[row].append(i)
                used[row] += docs[i].length
                break
        else:
            rows.append([i])
            used.append(docs[i].length)
    return rows


def test_packed_positions_continue_from_the_prompt_for_both_responses():
    prompt, chosen, rejected = np.array([11, 12, 13]), np.array([21, 22]), np.array([31, 32, 33, 34])
    packed = pack_documents(pair_documents([prompt], [chosen], [rejected]), 0)
    assert packed.input_ids[0].tolist() == [11, 12, 13, 21, 22, 31, 32, 33, 34]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]
    assert packed.branch_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    # The first token of each response is predicted from the prompt's last position (column 2).
    assert packed.predict_from.tolist() == [2, 3, 2, 5, 6, 7]
    assert packed.targets.tolist() == [21, 22, 31, 32, 33, 34]
    assert packed.sequence_index.tolist() == [0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rejected_does_not_see_chosen_nor_another_document(kind):
    """Changing a pair's chosen tokens changes only its chosen log-prob; the rejected one and the
    other documents packed in the same row stay bitwise the same."""
    model, docs = model_of(kind), documents(seed=2, pairs=3, dref=2)
    with torch.no_grad():
        before = batch_logprobs(model, pack_documents(docs, 0, pack_tokens=10_000)).logps
        docs[1].responses[0] = (docs[1].responses[0][0], (docs[1].responses[0][1] + 7) % VOCAB)
        after = batch_logprobs(model, pack_documents(docs, 0, pack_tokens=10_000)).logps
    changed = (before != after).nonzero().flatten().tolist()
    assert changed == [1]  # chosen of pair 1 only


def test_gradients_of_packed_equal_padded():
    model, docs = model_of("llama"), documents(seed=3)
    weights = torch.linspace(-1, 1, 13)
    grads = {}
    for name, inputs in (("padded", pad_documents(docs, 0)), ("packed", pack_documents(docs, 0))):
        model.zero_grad()
        (batch_logprobs(model, inputs, chunk_tokens=5).logps * weights).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads["padded"].items():
        torch.testing.assert_close(grads["packed"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_eager_attention_takes_the_additive_form_of_the_mask():
    docs = documents(seed=4)
    with torch.no_grad():
        sdpa = batch_logprobs(model_of("llama", "sdpa"), pack_documents(docs, 0)).logps
        eager = batch_logprobs(model_of("llama", "eager"), pack_documents(docs, 0)).logps
    torch.testing.assert_close(eager, sdpa, **SUM_TOLERANCE)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_in_sequence_order(side):
    docs = documents(seed=5, pairs=2, dref=1)
    padded = pad_documents(docs, 9, side, pad_to_multiple_of=8)
    rows = [(doc.prompt, response, index) for doc in docs for index, response in doc.responses]
    assert padded.input_ids.shape == (5, padded.input_ids.shape[1]) and padded.input_ids.shape[1] % 8 == 0
    for prompt, response, index in rows:
        real = padded.attention_mask[index]
        assert padded.input_ids[index][real].tolist() == prompt.tolist() + response.tolist()
        assert padded.position_ids[index][real].tolist() == list(range(len(prompt) + len(response)))
        edge = real.nonzero().flatten()[0 if side == "right" else -1].item()
        assert edge == (0 if side == "right" else padded.input_ids.shape[1] - 1)
        assert padded.targets[padded.sequence_index == index].tolist() == response.tolist()


def test_sequence_indices_must_cover_every_output_once():
    from mpo_dist.data.layout import Document

    with pytest.raises(ValueError, match=r"indices must be 0..1, each once; got \[0, 2\]"):
        pad_documents([Document(np.array([1]), [(0, np.array([2])), (2, np.array([3]))])], 0)


def test_scoring_with_packing_gives_the_padded_reference_log_probs(stories_inputs, tmp_path):
    """tools/score_reference.py --packing always: the same reference log-probs and token counts as
    --packing never, on stories260K and HH-RLHF pairs (fp32, to 1e-4 on sums of up to ~100 tokens)."""
    from support import QUIET

    from mpo_dist.data.shards import Manifest, ShardCursor
    from mpo_dist.producers.score import score_pairs

    model = AutoModelForCausalLM.from_pretrained(str(stories_inputs["model"])).float()
    for packing in ("never", "always"):
        score_pairs(model, stories_inputs["pairs"], tmp_path / packing, batch_size=4, packing=packing, log=QUIET)
    padded_dir, packed_dir = tmp_path / "never", tmp_path / "always"
    compared = 0
    for shard in Manifest.read(padded_dir).shards:
        padded = list(ShardCursor(padded_dir / shard.name, "ref_logps", shard.num_samples))
        packed = list(ShardCursor(packed_dir / shard.name, "ref_logps", shard.num_samples))
        assert [key for key, _, _ in packed] == [key for key, _, _ in padded]
        for (_, want, _), (_, got, _) in zip(padded, packed):
            for name in want:
                if "logp" in name:
                    assert got[name] == pytest.approx(want[name], abs=1e-4), name
                else:
                    assert got[name] == want[name], name
            compared += 1
    assert compared == 40


def test_given_a_row_cost_packing_picks_the_cheapest_row_length():
    """8 pairs of 320 tokens and 8 D_ref samples of 192: rows of the longest document (320) leave
    each D_ref sample a row of its own (16 rows, 20% padding); rows of 512 hold one pair and one
    sample each, no padding. The cost (linear + attention FLOPs of the workload's model) picks 512."""
    from mpo_dist.flops import CostModel

    rng = np.random.default_rng(6)
    ids = lambda n: rng.integers(1, VOCAB, size=n)  # noqa: E731
    docs = pair_documents([ids(64) for _ in range(8)], [ids(128) for _ in range(8)], [ids(128) for _ in range(8)])
    docs += single_documents([ids(64) for _ in range(8)], [ids(128) for _ in range(8)], first_index=16)
    plain = pack_documents(docs, 0)
    assert plain.input_ids.shape == (16, 320) and plain.num_positions - plain.num_real_positions == 8 * 128
    model = CostModel(body_params=3_200_000, head_params=0, layers=4, hidden=256)
    cost = lambda rows, width: model.layout_cost(rows, width, dense_attention=True)  # noqa: E731
    chosen = pack_documents(docs, 0, row_cost=cost)
    assert chosen.input_ids.shape == (8, 512) and chosen.num_positions == chosen.num_real_positions
    assert cost(8, 512) < cost(16, 320)
    # A given data.pack_tokens is kept as it is.
    assert pack_documents(docs, 0, pack_tokens=384, row_cost=cost).input_ids.shape[1] == 384


def test_auto_layout_packs_when_the_cost_model_says_it_is_cheaper():
    """The synthetic workload's model (hidden 256, 4 layers): pairs of 64 + 128 + 128 tokens alone
    are cheaper packed (320 positions a pair instead of 384); with a 192-token D_ref sample per pair
    the packed rows grow to 512 and their masked attention costs more than padded rows of 192
    without a mask, so auto pads (as tools/bench_train.py measured: 11.9k vs 11.0k tokens/s packed
    vs padded for DPO, 11.1k vs 12.8k for MPO)."""
    from mpo_dist.data.layout import lay_out
    from mpo_dist.flops import CostModel

    rng = np.random.default_rng(7)
    ids = lambda n: rng.integers(1, VOCAB, size=n)  # noqa: E731
    pairs = pair_documents([ids(64) for _ in range(4)], [ids(128) for _ in range(4)], [ids(128) for _ in range(4)])
    dref = single_documents([ids(64) for _ in range(4)], [ids(128) for _ in range(4)], first_index=8)
    cost = CostModel(body_params=3_200_000, head_params=0, layers=4, hidden=256).layout_cost
    assert lay_out(pairs, packing="auto", pad_token_id=0, cost=cost).packed
    assert not lay_out(pairs + dref, packing="auto", pad_token_id=0, cost=cost).packed
    assert lay_out(pairs + dref, packing="always", pad_token_id=0, cost=cost).packed
    assert not lay_out(pairs, packing="never", pad_token_id=0, cost=cost).packed
    with pytest.raises(InputError, match="data.packing must be one of auto, always, never, got 'yes'"):
        lay_out(pairs, packing="yes", pad_token_id=0, cost=cost)


def test_bucketed_shapes_take_few_sizes_and_add_at_most_a_quarter():
    from mpo_dist.data.layout import shape_bucket

    assert [shape_bucket(n) for n in (1, 16, 17, 33, 64, 65, 100, 1000, 1025)] == [1, 16, 20, 40, 64, 80, 112, 1024, 1280]
    assert all(n <= shape_bucket(n) <= n * 1.25 for n in range(1, 5000))
    assert len({shape_bucket(n) for n in range(100, 1000)}) == 14  # 900 sizes, 14 shapes
    docs = documents(seed=8, pairs=7, dref=3)
    packed = pack_documents(docs, 0, pack_tokens=20, bucket_shapes=True)
    rows, width = packed.input_ids.shape
    plain = pack_documents(docs, 0, pack_tokens=20)
    assert (rows, width) == (shape_bucket(plain.input_ids.shape[0]), shape_bucket(plain.input_ids.shape[1]))
    assert len(packed.targets) == shape_bucket(len(plain.targets)) > len(plain.targets)  # head positions rounded up
    assert (packed.sequence_index == packed.num_sequences).sum() == len(packed.targets) - len(plain.targets)
