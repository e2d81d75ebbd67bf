"""Memory per rank of the inference stages: score, sample and on-policy evaluate at 1 and 2 processes.

    python tools/bench_stage_memory.py --work DIR [--ranks 1,2] [--stages score,sample,evaluate]
        [--pairs 4] [--prompt 16] [--response 8] [--max-new-tokens 8] [--allocator fixed|default]

Saves a random-init Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP
5632, vocab 32000, untied embeddings) once as bfloat16 safetensors in DIR/model (reused when there),
writes a few pairs of random token ids in two shards (one per rank at 2 processes), then runs each
tool under `python -m mpo_dist.launcher --standalone --nproc-per-node R` with --dtype bfloat16 and
--model-shards R (1: the whole model in one process; 2: each process holds half, the model
FSDP-sharded as inference_model.py builds it) and reads every rank's memory with
mpo_dist.process_memory: VmHWM (the kernel's peak resident set) and the highest RssAnon polled,
with glibc's own allocator by default, as users run the tools (`--allocator fixed` pins its mmap
threshold for every process: benchmark.ALLOCATORS).

VmHWM counts the pages of the safetensors file a rank maps while it reads its slices of the weights
(safetensors' get_slice reads through mmap; DCP's reader keeps a file open for all its tensors):
page cache, dropped from the process when the file is closed, not memory of its own. RssAnon leaves
them out, so "held" is the anonymous peak less the runtime baseline (a rank that imports the tools'
modules and joins the process group, measured at the same process count).

The bar (issue 23): a rank holds at most its share of the weights, plus what a sharded forward holds
gathered (the root: final norm and head, for the whole forward; and one other unit at a time: the input
embedding or a decoder layer), plus the working set, taken as what the 1-process run of the same stage
holds beyond its baseline and its whole weights; "+buf" adds the unit's all-gather buffers. The planner's
figure (mpo_dist/plan.py inference_memory) is printed beside each rank's. At 2 processes the score and
sample shards are checked to be the bytes of the 1-process run, and the evaluation report's values equal.
Conversion (tools/convert_checkpoint.py) is not run: it is one process whatever the training world
size, and its input, a 1.1B training checkpoint with AdamW state (~18 GB), is not cheap here;
tools/bench_convert_memory.py measures its memory against the model's size.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mpo_dist.benchmark import (ALLOCATORS, REPO, first_error_line, measure_ranks, run_in_child, subprocess_env,
                                write_runtime_script, write_workload_pairs)
from mpo_dist.cli import run_main, tool_parser
from mpo_dist.errors import InputError

MIB = 2**20
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
DTYPE = "bfloat16"
BATCH_SIZE = 4  # pairs (score), sequences (sample, evaluate) per forward
RUNTIME_MODULES = ("mpo_dist.producers.score", "mpo_dist.producers.sample", "mpo_dist.evaluate_model",
                   "mpo_dist.evaluate_on_policy", "transformers.models.llama.modeling_llama")  # what the stages import


@dataclass
class Run:
    stage: str
    ranks: int
    peaks: list[int]  # VmHWM of each rank
    anon_peaks: list[int]  # highest RssAnon polled, of each rank
    seconds: float


def save_model(folder: str) -> None:
    """The random-init model, initialised in bfloat16 (a float32 init would need twice the memory)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**TINYLLAMA), dtype=torch.bfloat16).save_pretrained(folder)


def prepare(work: Path, args, log) -> tuple[Path, Path]:
    model, pairs = work / "model", work / f"pairs-{args.pairs}x{args.prompt}+{args.response}"
    if not (model / "model.safetensors").is_file():
        start = time.monotonic()
        run_in_child(save_model, str(model), what=f"saving the random model in {model}")
        log(f"bench_stage_memory: random TinyLlama-shaped model saved in {model} ({time.monotonic() - start:.0f}s)")
    if not (pairs / "manifest.json").is_file():
        write_workload_pairs(pairs, args.pairs, args.prompt, args.response, TINYLLAMA["vocab_size"], seed=0,
                             per_shard=max(1, (args.pairs + 1) // 2))
    return model, pairs


def run_measured(target: list, ranks: int, args) -> Run:
    from mpo_dist.launcher import launch_command

    env = {**subprocess_env(max(1, 2 // ranks)), **ALLOCATORS[args.allocator]}
    peaks, seconds, code, output = measure_ranks(launch_command(ranks, target), ranks, env, args.run_timeout)
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, target[:1]))} at {ranks} processes failed: {first_error_line(output)}")
    if None in peaks:
        raise RuntimeError(f"{' '.join(map(str, target[:1]))} at {ranks} processes: rank {peaks.index(None)} was never seen")
    return Run("", ranks, [p.peak_bytes for p in peaks], [p.anon_peak_bytes for p in peaks], seconds)


def stage_command(stage: str, model: Path, pairs: Path, out: Path, ranks: int, args) -> list:
    common = ["--dtype", DTYPE, "--model-shards", ranks, "--batch-size", BATCH_SIZE]
    if stage == "score":
        return [REPO / "tools/score_reference.py", "--model", model, "--pairs", pairs, "--out", out, *common]
    if stage == "sample":
        return [REPO / "tools/sample_reference.py", "--model", model, "--pairs", pairs, "--out", out, "--num-samples", 1,
                "--max-new-tokens", args.max_new_tokens, *common]
    return [REPO / "tools/evaluate.py", "--model", model, "--reference-model", model, "--pairs", pairs, "--out",
            out / "report.json", "--on-policy-samples", 1, "--max-new-tokens", args.max_new_tokens, *common]


def same_output(stage: str, one: Path, other: Path) -> str:
    """Whether the 1-process output and this one agree: the same shard bytes, or the same report values
    (but for timings)."""
    if stage == "evaluate":
        first, second = (json.loads((folder / "report.json").read_text())["metrics"] for folder in (one, other))
        keys = [key for key in first if key.startswith("on_policy/") and not key.endswith("seconds")]
        differ = [key for key in keys if first[key] != second.get(key)]
        if differ:
            return f"report values differ: {', '.join(differ)}"
        return f"{len(keys)} on_policy values equal"
    shards = sorted(path.name for path in one.glob("*.tar"))
    differ = [name for name in shards if (one / name).read_bytes() != (other / name).read_bytes()]
    if differ or not shards:
        return f"shards differ: {differ or 'none written'}"
    return f"{len(shards)} shards byte-identical"


def planner_bytes(model: Path, stage: str, ranks: int, args) -> float | None:
    """mpo_dist/plan.py's per-rank figure for this stage, or None if the planner cannot give it."""
    try:
        import torch

        from mpo_dist.model import build_model_from_config, read_model_config
        from mpo_dist.plan import Batch, Cluster, ModelShape, inference_memory

        shape = ModelShape.of(build_model_from_config(read_model_config(model, "--model"), torch.bfloat16))
        cluster = Cluster(nodes=1, gpus_per_node=ranks, memory_bytes=0, device="cpu")
        length = args.prompt + args.response
        batch = {"score": Batch(2 * BATCH_SIZE, length, 2 * BATCH_SIZE * args.response),
                 "sample": Batch(BATCH_SIZE, args.prompt, BATCH_SIZE),
                 "evaluate": Batch(BATCH_SIZE, args.prompt + args.max_new_tokens, BATCH_SIZE * args.max_new_tokens)}[stage]
        return inference_memory(shape, cluster, DTYPE, stage, ranks, batch, args.max_new_tokens).peak_bytes
    except Exception:  # noqa: BLE001  the planner is optional here: its column is left empty
        return None


def model_sizes(model: Path) -> tuple[int, int, int]:
    """Bytes of (every weight, the root: final norm and head, gathered for the whole forward, the larger
    of the other units gathered one at a time: the input embedding and one decoder layer)."""
    from safetensors import safe_open

    sizes = {"total": 0, "root": 0, "embedding": 0, "layer": 0}
    with safe_open(str(model / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            size = 2 * math.prod(handle.get_slice(key).get_shape())
            sizes["total"] += size
            part = "layer" if ".layers.0." in key else "embedding" if "embed_tokens" in key else \
                "root" if ".layers." not in key else None
            if part is not None:
                sizes[part] += size
    return sizes["total"], sizes["root"], max(sizes["embedding"], sizes["layer"])


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--work", required=True, help="folder for the model and pairs (reused) and the outputs")
    parser.add_argument("--ranks", default="1,2", help="process counts, comma-separated; the first is the replica baseline")
    parser.add_argument("--stages", default="score,sample,evaluate", help="stages, comma-separated: score, sample, evaluate")
    parser.add_argument("--allocator", default="default", choices=sorted(ALLOCATORS),
                        help="glibc malloc: default (as users run the tools, which fix the threshold themselves when they "
                             "shard on a CPU) or fixed (MALLOC_MMAP_THRESHOLD_=65536 for every process)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs (their prompts are sampled and evaluated)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per pair")
    parser.add_argument("--response", type=int, default=8, help="tokens of each response of a pair")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="longest sampled response")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds one run may take")
    args = parser.parse_args(argv)
    return run_main("bench_stage_memory", lambda info: bench(args))


def bench(args, log=print) -> None:
    stages, ranks_list = args.stages.split(","), [int(r) for r in args.ranks.split(",")]
    if unknown := set(stages) - {"score", "sample", "evaluate"}:
        raise InputError(f"--stages: unknown {sorted(unknown)}; choose among score, sample, evaluate")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, pairs = prepare(work, args, log)
    weights, root, unit = model_sizes(model)
    runtime = write_runtime_script(work, RUNTIME_MODULES)
    baseline = {ranks: run_measured([runtime], ranks, args) for ranks in ranks_list}
    log(f"model: {weights / MIB:,.0f} MiB of bf16 weights; gathered in a sharded forward: the root (norm, head) "
        f"{root / MIB:,.0f} MiB, then one unit at a time (embedding or a layer), at most {unit / MIB:,.0f} MiB")
    log("runtime baseline (imports + process group), anonymous MiB per rank: " + "; ".join(
        f"{r} processes {', '.join(f'{b / MIB:,.0f}' for b in baseline[r].anon_peaks)}" for r in ranks_list))
    header = (f"{'stage':<9}{'procs':>5}{'rank':>5}{'VmHWM':>8}{'anon':>8}{'planner':>8}{'HWM/1p':>7}{'anon/1p':>8}"
              f"{'held/W':>7}{'bar/W':>6}{'+buf/W':>7}  {'verdict':<8}{'s':>5}  output")
    lines = [header]
    for stage in stages:
        models = 2 if stage == "evaluate" else 1
        first: Run | None = None
        for ranks in ranks_list:
            out = work / "out" / f"{stage}-{ranks}"
            shutil.rmtree(out, ignore_errors=True)  # the tools skip finished shards
            out.mkdir(parents=True)
            run = run_measured(stage_command(stage, model, pairs, out, ranks, args), ranks, args)
            first = first or run
            check = "(the replica)" if run is first else same_output(stage, work / "out" / f"{stage}-{first.ranks}", out)
            planned = planner_bytes(model, stage, ranks, args)
            working = first.anon_peaks[0] - baseline[first.ranks].anon_peaks[0] - models * weights / first.ranks
            # The bar: the rank's share, the root and one unit gathered, the working set; "+buf": with the
            # unit's all-gather buffers too (FSDP2 copies the local shard into the all-gather input and
            # the gathered output into the unsharded parameters: (2 + 1/N) x the unit while it gathers).
            share = models * weights / ranks + max(working, 0)
            bar = share + (root + unit if ranks > 1 else 0)
            with_buffers = share + (root + (2 + 1 / ranks) * unit if ranks > 1 else 0)
            for rank in range(ranks):
                held = run.anon_peaks[rank] - baseline[ranks].anon_peaks[rank]
                lines.append(
                    f"{stage:<9}{ranks:>5}{rank:>5}{run.peaks[rank] / MIB:>8,.0f}{run.anon_peaks[rank] / MIB:>8,.0f}"
                    f"{'-' if planned is None else f'{planned / MIB:,.0f}':>8}{run.peaks[rank] / first.peaks[0]:>7.2f}"
                    f"{run.anon_peaks[rank] / first.anon_peaks[0]:>8.2f}{held / (models * weights):>7.2f}"
                    f"{bar / (models * weights):>6.2f}{with_buffers / (models * weights):>7.2f}  "
                    f"{'within' if held <= bar * 1.05 else '+buffers' if held <= with_buffers * 1.05 else 'over':<8}"
                    f"{run.seconds:>5.0f}  {check if rank == 0 else ''}")
            log(lines[-1])
            if run is not first and not check.endswith(("identical", "equal")):
                raise AssertionError(f"{stage}: {ranks} processes' output differs from {first.ranks}'s: {check}")
    log("\n".join(lines + [
        "MiB; W: the stage's weights (one model, two for evaluate); held: anon less the runtime baseline; "
        "HWM/1p, anon/1p: against the 1-process run; verdict: held within the bar (5% slack), within it with "
        "the all-gather buffers (+buffers), or over"]))


if __name__ == "__main__":
    sys.exit(main())
