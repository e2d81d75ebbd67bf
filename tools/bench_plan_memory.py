"""The planner against measured memory: each process's real peak beside mpo_dist/plan.py's figure.

    python tools/bench_plan_memory.py [--sizes 20m,80m,250m] [--ranks 1,2] [--stages runtime,train] [--steps 2]

For every stage, model size and rank count it runs the real program on this machine's CPU (gloo),
reads every rank's peak resident memory (VmHWM, mpo_dist/process_memory.py) and prints it beside
the planner's peak for that rank (`--device cpu`: the "runtime" term included) and their ratio.
Models are random-init float32 Llamas (vocab 32000; `SIZES`) built from model.config; pairs are
random token ids, 16 prompt + 48 response tokens, with made-up reference log-probs (the values do
not change memory). A stage is one function in `STAGES`: (size, ranks, work folder, args) -> Row.

- runtime: a rank that imports what the trainer imports and joins the process group: the planner's
  constant "runtime" term;
- train: `python -m mpo_dist.launcher --standalone --nproc-per-node R -m mpo_dist.train` for
  --steps steps (DPO, padded rows, data.batch_size pairs per rank, no eval), checkpoint included;
- score: tools/score_reference.py under the same launcher, the model (saved as float32 safetensors)
  sharded over the R processes, 4 x --batch-size pairs per forward, padded rows.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mpo_dist.benchmark import (ALLOCATORS, NO_EVAL, REPO, first_error_line, measure_ranks, run_in_child, subprocess_env,
                                write_runtime_script, write_workload_pairs)
from mpo_dist.cli import run_main, tool_parser
from mpo_dist.errors import InputError

VOCAB, PROMPT, RESPONSE = 32000, 16, 48
# name -> (hidden, layers); MLP 8/3 x hidden rounded to 16, 64-wide heads, untied embeddings.
SIZES = {"20m": (256, 4), "80m": (512, 16), "250m": (1024, 14)}
RUNTIME_MODULES = ("mpo_dist.trainer", "transformers.models.llama.modeling_llama")  # what the trainer imports


@dataclass
class Row:
    stage: str
    params: int
    ranks: int
    measured: list[int]  # peak bytes of each rank
    planned: float
    seconds: float
    error: str = ""


def model_config(size: str) -> dict:
    hidden, layers = SIZES[size]
    return dict(model_type="llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 15) // 16 * 16,
                num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_data(folder: Path, num_pairs: int = 64) -> tuple[Path, Path]:
    """Pairs of random ids and reference shards with the same keys (benchmark.write_workload_pairs' layout)."""
    from mpo_dist.data.samples import write_reference_shard
    from mpo_dist.data.shards import Manifest, ShardInfo

    pairs, reference = folder / "pairs", folder / "reference"
    if not (reference / "manifest.json").is_file():
        write_workload_pairs(pairs, num_pairs, PROMPT, RESPONSE, VOCAB, seed=0, per_shard=num_pairs)
        manifest = Manifest.read(pairs, "pairs")
        reference.mkdir(parents=True, exist_ok=True)
        keys = [f"{key:09d}" for key in range(num_pairs)]
        write_reference_shard(reference / manifest.shards[0].name, keys, [-50.0] * num_pairs, [-51.0] * num_pairs,
                              [RESPONSE] * num_pairs, [RESPONSE] * num_pairs)
        Manifest("ref_logps", manifest.tokenizer_hash, [ShardInfo(manifest.shards[0].name, num_pairs)]).write(reference)
    return pairs, reference


def run_measured(command: list[str], ranks: int, args) -> tuple[list[int], float, str]:
    """Each rank's peak resident bytes (by rank), seconds, and the first error line ('' when it succeeded)."""
    env = {**subprocess_env(threads=max(1, 2 // ranks)), **ALLOCATORS[args.allocator]}
    peaks, seconds, code, output = measure_ranks(command, ranks, env, args.run_timeout)
    return [0 if p is None else p.peak_bytes for p in peaks], seconds, "" if code == 0 else first_error_line(output)


def cpu_cluster(ranks: int):
    from mpo_dist.parallelize import device_memory_bytes
    from mpo_dist.plan import Cluster

    return Cluster(nodes=1, gpus_per_node=ranks, memory_bytes=device_memory_bytes("cpu") // ranks, device="cpu")


def stage_runtime(size: str, ranks: int, work: Path, args) -> Row:
    from mpo_dist.launcher import launch_command
    from mpo_dist.plan import CPU_RUNTIME_BYTES

    script = write_runtime_script(work, RUNTIME_MODULES)
    measured, seconds, error = run_measured(launch_command(ranks, [script]), ranks, args)
    return Row("runtime", 0, ranks, measured, CPU_RUNTIME_BYTES, seconds, error)


def train_overrides(size: str, ranks: int, work: Path, args) -> list[str]:
    pairs, reference = make_data(work / "data")
    return [*NO_EVAL, "model.path=", f"model.config={json.dumps(model_config(size))}", "model.dtype=float32",
            f"data.pairs={pairs}", f"data.reference={reference}", "data.dref=", "loss.name=dpo", "loss.tau=0",
            f"data.batch_size={args.batch_size}", f"training.global_batch_size={args.batch_size * ranks}",
            "data.packing=never", "data.pad_to_multiple_of=1", f"training.steps={args.steps}", "checkpoint.interval=0",
            "checkpoint.keep=1", "checkpoint.resume=none", "metrics.tensorboard=false", "optim.warmup_steps=0",
            f"job.output_dir={work / f'train-{size}-{ranks}'}", "job.overwrite_output_dir=true"]


def stage_train(size: str, ranks: int, work: Path, args) -> Row:
    from mpo_dist.config import grad_accum_for, load_config
    from mpo_dist.launcher import train_command
    from mpo_dist.plan import build_shape, longest_row, training_batch, training_memory

    overrides = train_overrides(size, ranks, work, args)
    config_file = REPO / "configs" / "tiny_cpu.yaml"
    config = load_config(str(config_file), overrides)
    shape, _ = build_shape(config.model)
    batch = training_batch(config.data, longest_row(config.data.pairs)[0])
    plan = training_memory(shape, cpu_cluster(ranks), config.parallel, "float32", batch, ranks, grad_accum_for(config, ranks))
    measured, seconds, error = run_measured(train_command(config_file, overrides, ranks), ranks, args)
    return Row("train", shape.params, ranks, measured, plan.peak_bytes, seconds, error)


def random_model(size: str, work: Path) -> Path:
    """A random-init float32 Llama of `size` saved as safetensors (reused when present)."""
    from mpo_dist.benchmark import _save_random_model

    folder = work / f"model-{size}"
    if not (folder / "config.json").is_file():
        config = {k: v for k, v in model_config(size).items() if k != "model_type"}
        run_in_child(_save_random_model, config, "float32", 0, str(folder), what=f"saving the {size} model in {folder}")
    return folder


def stage_score(size: str, ranks: int, work: Path, args) -> Row:
    """tools/score_reference.py with the model sharded over the ranks (its default --model-shards)."""
    from mpo_dist.launcher import launch_command
    from mpo_dist.plan import Batch, build_shape, inference_memory
    from mpo_dist.config import ModelConfig

    pairs, _ = make_data(work / "data")
    model = random_model(size, work)
    out = work / f"score-{size}-{ranks}"
    command = launch_command(ranks, [REPO / "tools" / "score_reference.py", "--model", model, "--pairs", pairs,
                                     "--out", out, "--batch-size", args.batch_size * 4, "--packing", "never",
                                     "--dtype", "float32"])
    shutil.rmtree(out, ignore_errors=True)  # a fresh job: score_reference skips shards already there
    shape, _ = build_shape(ModelConfig(config=model_config(size)))
    rows = 2 * args.batch_size * 4
    plan = inference_memory(shape, cpu_cluster(ranks), "float32", "score", ranks,
                            Batch(rows=rows, width=PROMPT + RESPONSE, head_positions=rows * RESPONSE))
    measured, seconds, error = run_measured(command, ranks, args)
    return Row("score", shape.params, ranks, measured, plan.peak_bytes, seconds, error)


STAGES = {"runtime": stage_runtime, "train": stage_train, "score": stage_score}


def format_rows(rows: list[Row]) -> str:
    mib = 2**20
    lines = ["| stage | params | ranks | measured peak per rank (MiB) | planned (MiB) | planned / measured | seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.error:
            lines.append(f"| {row.stage} | {row.params / 1e6:,.1f}M | {row.ranks} | failed: {row.error} | | | |")
            continue
        worst = max(row.measured)
        lines.append(f"| {row.stage} | {row.params / 1e6:,.1f}M | {row.ranks} | {', '.join(f'{m / mib:,.0f}' for m in row.measured)} "
                     f"| {row.planned / mib:,.0f} | {row.planned / worst:.2f} | {row.seconds:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--sizes", default="20m,80m,250m", help=f"model sizes, comma-separated: {', '.join(SIZES)}")
    parser.add_argument("--ranks", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--stages", default="runtime,train,score", help=f"stages, comma-separated: {', '.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run (step 2 runs with the optimizer state step 1 made)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per rank per micro-batch (data.batch_size)")
    parser.add_argument("--allocator", default="fixed", choices=sorted(ALLOCATORS),
                        help="glibc malloc of the runs: fixed (MALLOC_MMAP_THRESHOLD_=65536: freed blocks return to the "
                             "system) or default (glibc's dynamic threshold: freed blocks stay in the heap)")
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds before a run is stopped")
    parser.add_argument("--work", default=None, help="folder for data and runs; default: a temporary folder, removed")
    args = parser.parse_args(argv)
    return run_main("bench_plan_memory", lambda info: bench(args))


def bench(args) -> None:
    stages, sizes = args.stages.split(","), args.sizes.split(",")
    unknown = [s for s in stages if s not in STAGES] + [s for s in sizes if s not in SIZES]
    if unknown:
        raise InputError(f"unknown stage or size: {', '.join(unknown)}")
    with tempfile.TemporaryDirectory(prefix="bench_plan_memory-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for stage in stages:
            for size in (sizes[:1] if stage == "runtime" else sizes):
                for ranks in map(int, args.ranks.split(",")):
                    rows.append(STAGES[stage](size, ranks, work, args))
                    print(format_rows(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_rows(rows))


if __name__ == "__main__":
    sys.exit(main())
