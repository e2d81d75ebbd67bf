"""Sampled tokens/s of the D_ref sampler (`mpo_dist.producers.sample.generate`) against transformers' batched
`model.generate`: the same model, prompts, batch size, max_new_tokens, temperature and top-p.

    python tools/bench_sampler.py [--model ../shared/data/stories260K] [--pairs DIR] [--num-prompts 64]
        [--batch-size 16] [--max-new-tokens 384] [--temperature 1.0] [--top-p 1.0] [--eos-ids 1 2]
        [--rounds 3] [--device auto|cpu|cuda|cuda:N] [--dtype auto|float32|bfloat16|float16]
        [--json PATH] [--threads N]

Prompts are story openings (default) or the first prompts of pairs shards (`--pairs`). transformers
decodes each batch of `--batch-size` prompts until its longest response ends (do_sample, KV cache);
the sampler refills a finished row's slot with the next prompt ("continuous"), and is also timed
with refills off ("static"). Tokens are response tokens up to and including the first stop token,
counted the same way for every sampler. The samplers alternate within each round, so a busy machine
slows them alike; the table ends with each one's median.

Device and dtype. `--device auto` is the GPU (`cuda`, device 0) when torch sees one, else the CPU;
`--dtype auto` is bfloat16 on a GPU or a CPU that computes it natively, else float32 (as the
trainer's `model.dtype=auto`). The model is loaded in that dtype and
moved to that device, and every sampler decodes there. Before round 1 every sampler decodes one
batch (plus one refill's prompts) untimed: on a GPU the first calls load kernels and grow the
caching allocator, which would otherwise be charged to whichever sampler runs first. On a GPU each
timed run starts and ends with `torch.cuda.synchronize()`, so the clock covers the queued kernels.

CPU time. On the CPU the table also shows the process's CPU seconds and tokens per CPU second,
which vary less than wall-clock rates on a shared machine (with more than one thread they are
lower). On a GPU these columns are left out: host CPU time there is kernel launches plus waiting
in synchronize, not work done; the JSON still records it (`cpu_seconds`) with
`tokens_per_cpu_second` null.

`--json PATH` writes the settings, device (with its name) and dtype, every round's figures (tokens,
seconds, tokens/s, CPU seconds, and on a GPU the allocator's peak bytes), and per sampler the
median tokens/s and its ratio to transformers generate's median.
"""

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mpo_dist.cli import add_threads_flag, run_main, tool_parser
from mpo_dist.compute_dtype import choose_dtype
from mpo_dist.errors import InputError
from mpo_dist.model import DTYPES as MODEL_DTYPES
from mpo_dist.producers.sample import SamplingParams, generate
from mpo_dist.producers.job import check_batch_size

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stories260K"
STORY_OPENINGS = ["Once upon a time", "One day, a little", "Tom and Sue", "The cat", "Lily wanted to",
                  "There was a big", "Ben had a red", "Mom said"]
DTYPES = {**MODEL_DTYPES, "float16": torch.float16}
BASELINE = "transformers generate"


def resolve_device(text: str) -> torch.device:
    """`--device`: auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N."""
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise InputError(f"--device {text}: no CUDA device is visible (torch.cuda.is_available() is False)")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {text}: this process sees {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
        return torch.device("cuda", index)
    raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")


def resolve_dtype(text: str, device: torch.device) -> torch.dtype:
    """`--dtype`: auto, float32 or bfloat16 as the trainer and the tools resolve them (one line says
    which and why), or float16."""
    if text not in DTYPES and text != "auto":
        raise InputError(f"--dtype must be auto, float32, bfloat16 or float16, got {text!r}")
    if text == "float16":
        return torch.float16
    return DTYPES[choose_dtype(text, device, "--dtype", "bench_sampler", log=print)]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (kernels run asynchronously on a GPU; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def run_ours(model, prompts, params: SamplingParams, eos: list[int], batch_size: int, refill: bool,
             device: torch.device) -> int:
    results = generate(model, prompts, list(range(len(prompts))), params, eos, 0, device,
                       batch_size=batch_size, refill_slots=None if refill else batch_size)
    return sum(len(response) for response, _ in results)


@torch.no_grad()
def run_transformers(model, prompts, params: SamplingParams, eos: list[int], batch_size: int,
                     device: torch.device) -> int:
    tokens = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(chunk):  # left padding, as decoder-only generation needs
            input_ids[row, width - len(prompt):] = torch.from_numpy(prompt)
            attention_mask[row, width - len(prompt):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
                             use_cache=True, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                             top_p=params.top_p, top_k=0, eos_token_id=eos, pad_token_id=0)
        tokens += sum(response_length(row, set(eos)) for row in out[:, width:].tolist())
    return tokens


def timed(run, device: torch.device) -> dict:
    """One run of a sampler: tokens, wall and CPU seconds (and on a GPU the allocator's peak bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)  # nothing queued earlier is charged to this run
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens = run()
    synchronize(device)  # the clock stops once the device has done the work
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds, "cpu_seconds": cpu_seconds,
            "tokens_per_cpu_second": tokens / cpu_seconds if device.type == "cpu" and cpu_seconds > 0 else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def bench(args) -> None:
    from transformers import AutoModelForCausalLM

    import transformers

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    params.validate()
    if args.temperature == 0:
        raise InputError("--temperature 0 is greedy: this benchmark compares sampling (use a temperature > 0)")
    if args.rounds < 1 or args.num_prompts < 1:
        raise InputError(f"--rounds and --num-prompts must be >= 1, got {args.rounds} and {args.num_prompts}")
    check_batch_size(args.batch_size)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise InputError(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype).to(device).eval()
    prompts = pair_prompts(args.pairs, args.num_prompts) if args.pairs else story_prompts(args.model, args.num_prompts)

    def samplers(chosen: list[np.ndarray]) -> dict:
        return {
            "mpo_dist continuous": lambda: run_ours(model, chosen, params, args.eos_ids, args.batch_size, True, device),
            "mpo_dist static": lambda: run_ours(model, chosen, params, args.eos_ids, args.batch_size, False, device),
            BASELINE: lambda: run_transformers(model, chosen, params, args.eos_ids, args.batch_size, device),
        }

    on_cpu = device.type == "cpu"
    print(f"{len(prompts)} prompts, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, temperature "
          f"{args.temperature}, top-p {args.top_p}, stop ids {args.eos_ids}, {device} ({device_name(device)}), "
          f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads")
    # Warm-up, untimed: one batch and one refill's prompts (so the continuous sampler also joins a
    # refill once). On a GPU the first calls load CUDA kernels (lazily, per kernel), create the cuBLAS
    # handle and grow the caching allocator; on the CPU, lazy imports and first-call setup. Without it
    # round 1's first sampler would pay all of that.
    warmup = prompts[: args.batch_size + max(1, args.batch_size // 8)]
    for run in samplers(warmup).values():
        run()
    synchronize(device)
    print(f"{'round':<6} {'sampler':<22} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}"
          + (f" {'CPU s':>7} {'tokens/CPU s':>12}" if on_cpu else ""))
    timed_runs = samplers(prompts)
    rounds: list[dict] = []
    for round_index in range(1, args.rounds + 1):
        for name, run in timed_runs.items():
            figures = timed(run, device)
            rounds.append({"round": round_index, "sampler": name, **figures})
            print(f"{round_index:<6} {name:<22} {figures['tokens']:>8,} {figures['seconds']:>8.2f} "
                  f"{figures['tokens_per_second']:>9,.0f}"
                  + (f" {figures['cpu_seconds']:>7.2f} {figures['tokens_per_cpu_second'] or 0:>12,.0f}" if on_cpu else ""),
                  flush=True)

    def median_of(name: str, key: str) -> float | None:
        values = [r[key] for r in rounds if r["sampler"] == name]
        return None if None in values else statistics.median(values)

    baseline = median_of(BASELINE, "tokens_per_second")
    medians = {}
    for name in timed_runs:
        median = median_of(name, "tokens_per_second")
        medians[name] = {"tokens_per_second": median, "tokens_per_cpu_second": median_of(name, "tokens_per_cpu_second"),
                         "ratio_to_generate": median / baseline}
        cpu_column = f" {'':>7} {medians[name]['tokens_per_cpu_second'] or 0:>12,.0f}" if on_cpu else ""
        print(f"{'median':<6} {name:<22} {'':>8} {'':>8} {median:>9,.0f}{cpu_column}  "
              f"({median / baseline:.2f}x generate's tokens/s)", flush=True)
    if args.json:
        report = {
            "settings": {"model": str(args.model), "pairs": args.pairs or None, "num_prompts": len(prompts),
                         "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                         "temperature": args.temperature, "top_p": args.top_p, "eos_ids": args.eos_ids,
                         "rounds": args.rounds, "warmup_prompts": len(warmup), "threads": torch.get_num_threads()},
            "device": str(device), "device_name": device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "baseline": BASELINE,
            "runs": rounds,
            "medians": medians,
        }
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"bench_sampler: figures written to {args.json}", file=sys.stderr, flush=True)


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
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="the model's dtype: auto (bfloat16 on cuda or a CPU that computes it natively, else "
                             "float32), float32, bfloat16 or float16")
    parser.add_argument("--json", default="", help="also write every round's figures and the medians to this JSON file")
    add_threads_flag(parser)
    args = parser.parse_args(argv)
    return run_main("bench_sampler", lambda info: bench(args), threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
