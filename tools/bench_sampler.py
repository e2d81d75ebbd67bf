"""Sampled tokens/s of the D_ref sampler (`mpo_dist.sampling.generate`) against transformers' batched
`model.generate`: the same model, prompts, batch size, max_new_tokens, temperature and top-p.

    python tools/bench_sampler.py [--model ../shared/data/stories260K] [--pairs DIR] [--num-prompts 64]
        [--batch-size 16] [--max-new-tokens 384] [--temperature 1.0] [--top-p 1.0] [--eos-ids 1 2]
        [--rounds 3] [--threads N]

Prompts are story openings (default) or the first prompts of pairs shards (`--pairs`). transformers
decodes each batch of `--batch-size` prompts until its longest response ends (do_sample, KV cache);
the sampler refills a finished row's slot with the next prompt ("continuous"), and is also timed
with refills off ("static"). Tokens are response tokens up to and including the first stop token,
counted the same way for every sampler. The samplers alternate within each round, so a busy machine
slows them alike; the table ends with each one's median. Tokens per CPU second (the process's CPU
time) vary less than wall-clock rates on a shared machine; with more than one thread they are lower.
"""

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mpo_dist.cli import add_threads_flag, run_main, tool_parser
from mpo_dist.errors import InputError
from mpo_dist.sampling import SamplingParams, generate
from mpo_dist.shard_job import check_batch_size

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stories260K"
STORY_OPENINGS = ["Once upon a time", "One day, a little", "Tom and Sue", "The cat", "Lily wanted to",
                  "There was a big", "Ben had a red", "Mom said"]


def story_prompts(model_dir: str, count: int) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    openings = [np.asarray(tokenizer(text)["input_ids"], dtype=np.int64) for text in STORY_OPENINGS]
    return [openings[i % len(openings)] for i in range(count)]


def pair_prompts(pairs_dir: str, count: int) -> list[np.ndarray]:
    from mpo_dist.data.shards import Manifest, ShardCursor

    prompts = []
    for shard in Manifest.read(pairs_dir, "pairs").shards:
        for _, _, arrays in ShardCursor(Path(pairs_dir) / shard.name, "pairs", shard.num_samples):
            prompts.append(arrays["prompt_ids"].astype(np.int64))
            if len(prompts) == count:
                return prompts
    raise InputError(f"--pairs {pairs_dir} holds {len(prompts)} prompts, fewer than --num-prompts {count}")


def response_length(row: list[int], eos: set[int]) -> int:
    """Tokens up to and including the first stop token (all of them when none stops the row)."""
    return next((i + 1 for i, token in enumerate(row) if token in eos), len(row))


def run_ours(model, prompts, params: SamplingParams, eos: list[int], batch_size: int, refill: bool) -> int:
    results = generate(model, prompts, list(range(len(prompts))), params, eos, 0, torch.device("cpu"),
                       batch_size=batch_size, refill_slots=None if refill else batch_size)
    return sum(len(response) for response, _ in results)


@torch.no_grad()
def run_transformers(model, prompts, params: SamplingParams, eos: list[int], batch_size: int) -> int:
    tokens = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(chunk):  # left padding, as decoder-only generation needs
            input_ids[row, width - len(prompt):] = torch.from_numpy(prompt)
            attention_mask[row, width - len(prompt):] = 1
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, use_cache=True,
                             max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                             top_p=params.top_p, top_k=0, eos_token_id=eos, pad_token_id=0)
        tokens += sum(response_length(row, set(eos)) for row in out[:, width:].tolist())
    return tokens


def bench(args) -> None:
    from transformers import AutoModelForCausalLM

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    params.validate()
    if args.temperature == 0:
        raise InputError("--temperature 0 is greedy: this benchmark compares sampling (use a temperature > 0)")
    if args.rounds < 1 or args.num_prompts < 1:
        raise InputError(f"--rounds and --num-prompts must be >= 1, got {args.rounds} and {args.num_prompts}")
    check_batch_size(args.batch_size)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    prompts = pair_prompts(args.pairs, args.num_prompts) if args.pairs else story_prompts(args.model, args.num_prompts)
    samplers = {
        "mpo_dist continuous": lambda: run_ours(model, prompts, params, args.eos_ids, args.batch_size, refill=True),
        "mpo_dist static": lambda: run_ours(model, prompts, params, args.eos_ids, args.batch_size, refill=False),
        "transformers generate": lambda: run_transformers(model, prompts, params, args.eos_ids, args.batch_size),
    }
    print(f"{len(prompts)} prompts, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, temperature "
          f"{args.temperature}, top-p {args.top_p}, stop ids {args.eos_ids}, {torch.get_num_threads()} threads")
    print(f"{'round':<6} {'sampler':<22} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'CPU s':>7} {'tokens/CPU s':>12}")
    rates: dict[str, list[float]] = {name: [] for name in samplers}
    cpu_rates: dict[str, list[float]] = {name: [] for name in samplers}
    for round_index in range(1, args.rounds + 1):
        for name, run in samplers.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            tokens = run()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            rates[name].append(tokens / seconds)
            cpu_rates[name].append(tokens / cpu_seconds)
            print(f"{round_index:<6} {name:<22} {tokens:>8,} {seconds:>8.2f} {tokens / seconds:>9,.0f} "
                  f"{cpu_seconds:>7.2f} {tokens / cpu_seconds:>12,.0f}", flush=True)
    baseline = statistics.median(rates["transformers generate"])
    for name in samplers:
        median = statistics.median(rates[name])
        print(f"{'median':<6} {name:<22} {'':>8} {'':>8} {median:>9,.0f} {'':>7} "
              f"{statistics.median(cpu_rates[name]):>12,.0f}  ({median / baseline:.2f}x generate's tokens/s)")


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a local Hugging Face causal LM folder")
    parser.add_argument("--pairs", default="", help="take prompts from these pairs shards (empty: story openings)")
    parser.add_argument("--num-prompts", type=int, default=64, help="prompts sampled per run, one response each")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences decoded together, for every sampler")
    parser.add_argument("--max-new-tokens", type=int, default=384, help="longest response")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    parser.add_argument("--eos-ids", type=int, nargs="+", default=[1, 2],
                        help="stop tokens; stories260K ends a story with BOS (1), as llama2.c's sampler stops")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every sampler")
    add_threads_flag(parser)
    args = parser.parse_args(argv)
    return run_main("bench_sampler", lambda info: bench(args), threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
