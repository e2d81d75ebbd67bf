"""Before launch: will this run fit on these machines, what will it send, and how long will a step take.

    python tools/plan.py CONFIG [section.key=value ...] --nodes N --gpus-per-node G --gpu-memory-gib M
        [--stage train|score|sample|evaluate] [--mfu 0.4] [--peak-tflops T] [--max-length L]
        [--model-shards S] [--batch-size B] [--max-new-tokens K] [--model-config CONFIG_JSON] [--device cuda|cpu]

    python tools/plan.py configs/llama-70b.yaml --nodes 8 --gpus-per-node 8 --gpu-memory-gib 80

Builds the configured model on the meta device (no weights are read; a model.path that is not on this
machine is planned from its config.json given by --model-config, from model.config, or from a
built-in Llama-3 shape its folder name matches) and prints, per GPU: parameters, gradients, optimizer
state, activations with and without activation checkpointing (data.batch_size pairs of two rows, each
as long as the longest row of data.pairs or --max-length), the log-prob head's logits, the all-gather
and gradient buffers, a runtime allowance; the peak; the collective traffic per step within and
across nodes; a step's time and positions/s at --mfu of --peak-tflops. Then "fits" or "does not fit",
the largest term and what would make it fit. The model of each term: mpo_dist/plan.py; how it
compares with measured peaks: docs/planning.md.

Inference stages (score, sample, evaluate) plan the sharded tools: the model in model.dtype sharded
over --model-shards processes (default: a node's), gathered one layer at a time, one no-grad forward
of --batch-size pairs (sampling: --batch-size prompts and a KV cache of --max-new-tokens more).
"""

from __future__ import annotations

import sys

from mpo_dist.cli import run_main, tool_parser
from mpo_dist.errors import InputError

STAGES = ("train", "score", "sample", "evaluate")


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("config", help="the trainer's YAML config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as the trainer takes them")
    parser.add_argument("--nodes", type=int, default=1, help="nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (processes) per node")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="memory of one GPU in GiB (required for --device cuda; cpu: the host's share of a rank)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="what each process computes on")
    parser.add_argument("--stage", default="train", choices=STAGES, help="what to plan")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step time")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 TFLOP/s of one GPU; default: metrics.peak_tflops, else an H100's 989")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest row (prompt + response tokens); default: the longest of data.pairs' manifest, else 1024")
    parser.add_argument("--model-shards", type=int, default=None,
                        help="inference: processes one model is sharded over; default: --gpus-per-node")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="inference: pairs (score, evaluate) or prompts (sample) per forward; default: data.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="sample: tokens generated after each prompt")
    parser.add_argument("--model-config", default=None, help="a config.json (or its folder) to plan instead of model.path's")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main("plan", lambda info: print(make_report(args)))


def gib(value: float) -> str:
    return f"{value / 2**30:,.2f} GiB"


def make_report(args) -> str:
    from mpo_dist.compute_dtype import resolve_dtype
    from mpo_dist.config import load_config
    from mpo_dist.flops import KNOWN_PEAK_TFLOPS
    from mpo_dist.parallelize import device_memory_bytes
    from mpo_dist.plan import Cluster, build_shape, longest_row

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise InputError("--nodes and --gpus-per-node must be >= 1")
    config = load_config(args.config, args.overrides)
    if args.gpu_memory_gib is None and args.device == "cuda":
        raise InputError("--gpu-memory-gib is required (e.g. 80 for an H100 80GB)")
    memory = args.gpu_memory_gib * 2**30 if args.gpu_memory_gib else device_memory_bytes("cpu") // args.gpus_per_node
    cluster = Cluster(args.nodes, args.gpus_per_node, int(memory), args.device)
    # model.dtype=auto: bfloat16 on a GPU; on CPU what this machine would choose (compute_dtype.py).
    if args.device == "cpu":
        dtype = resolve_dtype(config.model.dtype, "cpu")[0]
    else:
        dtype = "bfloat16" if config.model.dtype == "auto" else config.model.dtype
    shape, source = build_shape(config.model, args.model_config)
    if args.max_length:
        max_length, length_source = args.max_length, "--max-length"
    else:
        max_length, length_source = longest_row(config.data.pairs)
    peak_tflops = args.peak_tflops or config.metrics.peak_tflops or KNOWN_PEAK_TFLOPS["H100"]
    lines = [f"plan: {args.config} | {args.stage} | {cluster.nodes} node(s) x {cluster.gpus_per_node} {args.device} "
             f"processes of {gib(cluster.memory_bytes)} | model.dtype {dtype}",
             f"model: {shape.params / 1e9:,.2f}B parameters, {shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab} "
             f"(from {source}); longest row {max_length} ({length_source})"]
    if args.stage == "train":
        lines += train_report(config, cluster, shape, dtype, max_length, args.mfu, peak_tflops)
    else:
        lines += inference_report(config, cluster, shape, dtype, max_length, args)
    return "\n".join(lines)


def describe_terms(plan, extra: dict[str, str] | None = None) -> list[str]:
    lines = ["memory per process:"]
    for term in plan.terms:
        note = (extra or {}).get(term.name, term.note)
        lines.append(f"  {term.name:<20} {gib(term.bytes):>14}  {note}")
    moments = ", ".join(f"{name} {gib(value)}" for name, value in plan.moments.items())
    lines.append(f"  {'peak':<20} {gib(plan.peak_bytes):>14}  the largest moment: {moments}")
    if plan.host_terms:
        lines.append(f"  host memory per process (CPU offload): {gib(plan.host_bytes)} ("
                     + ", ".join(f"{t.name} {gib(t.bytes)}" for t in plan.host_terms) + ")")
    return lines


def describe_verdict(result, memory_bytes: float, peak: float) -> list[str]:
    largest = f"largest term: {result.largest.name} ({gib(result.largest.bytes)})"
    if result.fits:
        return [f"verdict: fits: peak {gib(peak)} of {gib(memory_bytes)} ({peak / memory_bytes:.0%}); {largest}"]
    lines = [f"verdict: does not fit: peak {gib(peak)} > {gib(memory_bytes)}; {largest}"]
    if result.advice:
        lines.append("what to change (each alone):")
        lines += [f"  - {advice}" for advice in result.advice]
    return lines


def train_report(config, cluster, shape, dtype, max_length, mfu, peak_tflops) -> list[str]:
    from dataclasses import replace

    from mpo_dist.config import ConfigError, grad_accum_for
    from mpo_dist.plan import (activation_bytes, keeps_gathered, step_seconds, training_batch, training_changes,
                               training_flops, training_memory, training_traffic, verdict, ITEMSIZE)

    parallel = config.parallel
    replicate = parallel.dp_replicate
    shards = cluster.processes // replicate if parallel.dp_shard == -1 else parallel.dp_shard
    if replicate * shards != cluster.processes:
        raise InputError(f"parallel.dp_replicate ({replicate}) x parallel.dp_shard ({shards}) must equal the "
                         f"{cluster.processes} processes; set parallel.dp_replicate (e.g. the number of nodes) and dp_shard=-1")
    uses_dref = config.loss.name == "mpo" and config.loss.tau > 0
    batch = training_batch(config.data, max_length, config.data.dref_batch_size if uses_dref else 0)
    notes = []
    try:
        grad_accum = grad_accum_for(config, cluster.processes)
    except ConfigError as error:
        grad_accum = 1
        notes.append(f"note: {error}; planned with 1 micro-batch per step")
    plan = training_memory(shape, cluster, parallel, dtype, batch, shards, grad_accum)
    other = activation_bytes(shape, batch, ITEMSIZE[dtype], not parallel.activation_checkpointing)
    without_or_with = "with" if not parallel.activation_checkpointing else "without"
    resharded = not keeps_gathered(parallel, shape.params * ITEMSIZE[dtype], cluster.memory_bytes, shards)
    lines = [f"mesh: dp_replicate {replicate} x dp_shard {shards}; {config.data.batch_size} pairs per rank per micro-batch "
             f"= {batch.rows} rows x {batch.width} positions, {grad_accum} micro-batch(es) per step; offload "
             f"{'on' if getattr(parallel, 'cpu_offload', False) else 'off'}", *notes]
    activations_note = f"{plan.terms[[t.name for t in plan.terms].index('activations')].note} ({without_or_with}: {gib(other)})"
    lines += describe_terms(plan, {"activations": activations_note})
    one_pair = None
    if config.data.batch_size > 1:
        one_pair = training_batch(replace(config.data, batch_size=1, dref_batch_size=1), max_length, 1 if uses_dref else 0)
    changes = lambda: training_changes(shape, cluster, parallel, dtype, batch, shards, grad_accum, one_pair)  # noqa: E731
    lines += describe_verdict(verdict(plan, cluster.memory_bytes, changes), cluster.memory_bytes, plan.peak_bytes)
    traffic = training_traffic(shape, cluster, dtype, replicate, shards, resharded, grad_accum)
    lines.append(f"traffic per step per GPU: {traffic.intra_node / 1e9:,.1f} GB within a node, {traffic.inter_node / 1e9:,.1f} GB "
                 f"across nodes (all-gather in forward{' and backward' if resharded else ''}, float32 reduce-scatter"
                 f"{', HSDP all-reduce' if replicate > 1 else ''}; every micro-batch)")
    flops = grad_accum * training_flops(shape, batch)
    seconds = step_seconds(flops, peak_tflops, mfu)
    positions = grad_accum * batch.tokens * cluster.processes
    lines.append(f"time: {flops / 1e12:,.1f} TFLOP per GPU per step; at MFU {mfu:.0%} of {peak_tflops:,.0f} TFLOP/s: "
                 f"{seconds:,.2f} s per step, {positions / seconds:,.0f} positions/s over {cluster.processes} GPUs "
                 f"(padding included; {config.training.global_batch_size or config.data.batch_size * cluster.processes} pairs per step)")
    return lines


def inference_report(config, cluster, shape, dtype, max_length, args) -> list[str]:
    from mpo_dist.plan import Batch, inference_memory, verdict

    shards = args.model_shards or cluster.gpus_per_node
    if shards < 1 or cluster.processes % shards:
        raise InputError(f"--model-shards {shards} must divide the {cluster.processes} processes")
    pairs = args.batch_size or config.data.batch_size
    rows = pairs if args.stage == "sample" else 2 * pairs
    head = rows * args.max_new_tokens if args.stage == "sample" else rows * max_length
    batch = Batch(rows, max_length, head)
    plan = inference_memory(shape, cluster, dtype, args.stage, shards, batch, args.max_new_tokens)
    groups = cluster.processes // shards
    lines = [f"sharding: the model over {shards} processes, {groups} data-parallel group(s); {rows} rows x {max_length} "
             "positions per forward"]
    lines += describe_terms(plan)
    fewer = []
    if plan.peak_bytes > cluster.memory_bytes:
        more = shards * 2
        while more <= cluster.processes:
            bigger = inference_memory(shape, cluster, dtype, args.stage, more, batch, args.max_new_tokens)
            fewer.append((f"--model-shards {more}", bigger))
            if bigger.peak_bytes <= cluster.memory_bytes:
                break
            more *= 2
        if rows > 2:
            one = Batch(rows // pairs, max_length, head // pairs)
            fewer.append(("--batch-size 1", inference_memory(shape, cluster, dtype, args.stage, shards, one, args.max_new_tokens)))
    lines += describe_verdict(verdict(plan, cluster.memory_bytes, lambda: fewer), cluster.memory_bytes, plan.peak_bytes)
    return lines


if __name__ == "__main__":
    sys.exit(main())
