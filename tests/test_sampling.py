"""The D_ref sampler (`mpo_dist.producers.sample.generate`): its draws follow the model's distribution (tempered,
top-p filtered), greedy is the argmax, a sample does not depend on its batch or on refills, and any of
several stop ids ends a response. tools/bench_sampler.py runs and counts alike for every sampler."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from support import require_shared
from mpo_dist.producers.sample import SamplingParams, generate

CPU = torch.device("cpu")


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]  # tiny models


class FixedLogits(torch.nn.Module):
    """A stand-in language model whose next-token logits are the same after every prefix."""

    def __init__(self, logits: list[float]):
        from transformers import LlamaConfig

        super().__init__()
        self.next_logits = torch.tensor(logits, dtype=torch.float32)
        # Only for the (unused) cache: it decodes without one, so rows are never cut or joined.
        self.config = LlamaConfig(vocab_size=len(logits), hidden_size=8, num_hidden_layers=1, num_attention_heads=1)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, cache=None, logits_to_keep=0):
        return SimpleNamespace(logits=self.next_logits.expand(*input_ids.shape, -1))


def sample_tokens(model, samples: int, params: SamplingParams) -> np.ndarray:
    """[samples, max_new_tokens]: each sample's tokens, one per step (no stop ids)."""
    results = generate(model, [np.array([0])] * samples, list(range(samples)), params, None, 0, CPU, batch_size=4096)
    return np.stack([response for response, _ in results])


def token_counts(model, samples: int, params: SamplingParams) -> tuple[np.ndarray, int]:
    tokens = sample_tokens(model, samples, params)
    return np.bincount(tokens.ravel(), minlength=len(model.next_logits)), tokens.size


def z_scores(counts: np.ndarray, draws: int, probs: np.ndarray) -> np.ndarray:
    """Each token's count against its binomial expectation, in standard deviations."""
    sigma = np.sqrt(draws * probs * (1 - probs))
    return np.abs(counts - draws * probs) / np.maximum(sigma, 1e-12)


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    weights = np.exp(scaled - scaled.max())
    return weights / weights.sum()


def test_draws_follow_the_tempered_softmax_and_the_test_would_see_a_wrong_one():
    logits = [1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.2, 0.4]
    params = SamplingParams(max_new_tokens=4, temperature=0.7)
    tokens = sample_tokens(FixedLogits(logits), 12_000, params)  # 4 draws per sample, one per step
    counts, draws = np.bincount(tokens.ravel(), minlength=len(logits)), tokens.size
    assert draws == 48_000
    expected = softmax(logits, 0.7)
    assert z_scores(counts, draws, expected).max() < 5  # a false alarm: < 1e-5
    # The check is sharp enough to catch the likely bugs: the temperature ignored, an off-by-one in the
    # inverse CDF (each token gets its neighbour's mass), or every step reusing the step-0 uniform.
    assert z_scores(counts, draws, softmax(logits, 1.0)).max() > 20
    assert z_scores(counts, draws, np.roll(expected, 1)).max() > 20
    # Steps are independent draws: consecutive tokens differ as often as two independent draws do (±4 sigma).
    assert (tokens[:, 0] != tokens[:, 1]).mean() == pytest.approx(1 - (expected ** 2).sum(), abs=0.018)


def test_top_p_draws_only_from_the_nucleus_renormalised():
    probs = np.array([0.03, 0.5, 0.07, 0.25, 0.15])  # nucleus at 0.8: 0.5, 0.25, 0.15 (0.9 reached with 0.15)
    model = FixedLogits(np.log(probs).tolist())
    counts, draws = token_counts(model, 8_000, SamplingParams(max_new_tokens=2, top_p=0.8))
    assert counts[0] == 0 and counts[2] == 0  # outside the nucleus: never drawn
    nucleus = np.where(np.isin(np.arange(5), [1, 3, 4]), probs, 0) / 0.9
    assert z_scores(counts[[1, 3, 4]], draws, nucleus[[1, 3, 4]]).max() < 5
    # The top token always stays, however small top_p.
    counts, draws = token_counts(model, 100, SamplingParams(max_new_tokens=3, top_p=0.01))
    assert counts[1] == draws == 300


def test_any_of_several_stop_ids_ends_each_response_in_a_batch():
    model = FixedLogits([0.0] * 6)  # uniform over 6 tokens: a stop id (3 or 5) comes after 3 tokens on average
    params = SamplingParams(max_new_tokens=6)
    results = generate(model, [np.array([0])] * 300, list(range(300)), params, [3, 5], 0, CPU, batch_size=64)
    for response, reason in results:
        stops = np.isin(response, [3, 5])
        assert stops.sum() == (reason == "eos") and (reason == "length") == (len(response) == 6 and not stops.any())
        assert reason == "length" or stops[-1]  # the stop id is kept, as the last token
    lengths = [len(response) for response, _ in results]
    assert min(lengths) == 1 and max(lengths) == 6 and sum(reason == "eos" for _, reason in results) > 200


# ------------------------------------------------------------------------------------------- stories260K


@pytest.fixture(scope="module")
def stories_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(require_shared("stories260K"))).eval()


# Story openings of different lengths in stories260K's tokens ("Once upon a time", "One day, a little",
# "Tom", "Once upon a time, there", "The cat", "One day, a"). Stopping at a newline (13) as well as BOS
# (1, which ends a llama2.c story) and EOS (2) gives responses of many lengths.
OPENINGS = [[1, 403, 407, 261, 378], [1, 385, 328, 432, 261, 376], [1, 274, 287], [1, 403, 407, 261, 378, 432, 383],
            [1, 291, 280, 294], [1, 385, 328, 432, 261]]
PARAGRAPH = [1, 2, 13]
SENTENCE = [1, 2, 426]  # "." too: greedy paragraphs are long, its sentences are not


def argmax_loop(model, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """Greedy decoding the plainest way: one prompt, the whole prefix through the model at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt):]


def test_greedy_equals_an_unbatched_argmax_loop(stories_model):
    prompts = [np.array(opening) for opening in OPENINGS]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    batched = generate(stories_model, prompts, [0] * len(prompts), params, SENTENCE, 0, CPU, batch_size=3,
                       refill_slots=1)
    for prompt, (response, reason) in zip(prompts, batched):
        expected = argmax_loop(stories_model, prompt.tolist(), 24, SENTENCE)
        assert response.tolist() == expected and reason == ("eos" if expected[-1] in SENTENCE else "length")
    assert len({len(response) for response, _ in batched}) > 2  # rows ended at different steps: slots were refilled


def test_a_sample_is_the_same_alone_in_a_batch_and_with_refills(stories_model):
    """Per-sample random streams: a sample depends on its prompt and seed only. In a batch its
    probabilities differ from those alone by float rounding (a few 1e-6 at most), which changes a token
    only when its uniform falls that close to a CDF step (about 1 token in thousands on stories260K;
    not in these short samples), so the tokens are identical."""
    prompts = [np.array(opening) for opening in OPENINGS] + [np.array(OPENINGS[0])]
    seeds = [11, 12, 13, 14, 15, 16, 17]
    params = SamplingParams(max_new_tokens=20)
    alone = [generate(stories_model, [prompt], [seed], params, SENTENCE, 0, CPU)[0] for prompt, seed in zip(prompts, seeds)]
    together = generate(stories_model, prompts, seeds, params, SENTENCE, 0, CPU)
    refilled = generate(stories_model, prompts, seeds, params, SENTENCE, 0, CPU, batch_size=3, refill_slots=1)
    whole_batches = generate(stories_model, prompts, seeds, params, SENTENCE, 0, CPU, batch_size=3, refill_slots=3)
    for results in (together, refilled, whole_batches):
        assert [(r.tolist(), reason) for r, reason in results] == [(r.tolist(), reason) for r, reason in alone]
    assert {reason for _, reason in alone} == {"eos", "length"} and len({len(r) for r, _ in alone}) > 3
    assert alone[0][0].tolist() != alone[-1][0].tolist()  # the same prompt, another seed: another story


def _bench_sampler_module():
    import sys

    from support import REPO

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench_sampler
    finally:
        sys.path.remove(str(REPO / "tools"))
    return bench_sampler


def test_the_bench_tool_times_every_sampler_on_the_same_work(capsys, tmp_path):
    import json

    report_path = tmp_path / "bench.json"
    code = _bench_sampler_module().main(["--num-prompts", "6", "--batch-size", "4", "--max-new-tokens", "24", "--rounds", "2",
                                         "--eos-ids", *map(str, PARAGRAPH), "--threads", "1", "--device", "cpu",
                                         "--dtype", "float32", "--json", str(report_path)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[7:29].strip(): line.split() for line in lines if line.startswith("1 ")}
    names = ["mpo_dist continuous", "mpo_dist static", "transformers generate"]
    assert set(rows) == set(names)
    # Continuous and static batching sample the same responses: the same token count.
    assert rows["mpo_dist continuous"][3] == rows["mpo_dist static"][3]
    assert 6 <= int(rows["transformers generate"][3].replace(",", "")) <= 6 * 24
    assert [line.split()[0] for line in lines[-3:]] == ["median"] * 3
    # The JSON report: every round of every sampler, and medians with their ratio to generate.
    report = json.loads(report_path.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["settings"]["rounds"] == 2
    assert [run["sampler"] for run in report["runs"]] == names * 2
    assert report["runs"][0]["tokens"] == int(rows["mpo_dist continuous"][3].replace(",", ""))
    for name in names:
        rates = [run["tokens_per_second"] for run in report["runs"] if run["sampler"] == name]
        assert report["medians"][name]["tokens_per_second"] == pytest.approx(sum(rates) / 2)
        assert report["medians"][name]["ratio_to_generate"] == pytest.approx(
            report["medians"][name]["tokens_per_second"] / report["medians"]["transformers generate"]["tokens_per_second"])


def test_the_bench_tool_asked_for_a_gpu_without_one_says_so(monkeypatch, capfd):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _bench_sampler_module().main(["--num-prompts", "1", "--device", "cuda"]) == 2
    assert ("bench_sampler: error: --device cuda: no CUDA device is visible (torch.cuda.is_available() is False)"
            in capfd.readouterr().err)


def test_a_sliding_window_model_is_sampled_in_whole_batches_with_the_same_results():
    """A cache that is not plain key/value tensors (here sliding-window layers) is never padded or joined:
    batches are refilled only when all of their rows have ended, and the samples are those drawn alone."""
    from transformers import MistralConfig, MistralForCausalLM

    from mpo_dist.producers.sample import _kv_cache

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, sliding_window=4, max_position_embeddings=64)
    model = MistralForCausalLM(config).eval()
    (cache,) = _kv_cache(model).values()  # its keyword: `cache` (transformers 5.24), `past_key_values` (earlier)
    assert {type(layer).__name__ for layer in cache.layers} == {"DynamicSlidingWindowLayer"}
    prompts = [np.array([1, 5, 7]), np.array([1, 9]), np.array([1, 3, 4, 6, 8]), np.array([1])]
    params = SamplingParams(max_new_tokens=12)
    alone = [generate(model, [prompt], [seed], params, [5, 6], 0, CPU)[0] for seed, prompt in enumerate(prompts)]
    batched = generate(model, prompts, list(range(4)), params, [5, 6], 0, CPU, batch_size=2, refill_slots=1)
    assert [(r.tolist(), reason) for r, reason in batched] == [(r.tolist(), reason) for r, reason in alone]
    assert {reason for _, reason in alone} == {"eos", "length"}
