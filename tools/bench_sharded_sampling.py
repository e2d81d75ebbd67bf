"""Sampling a model over two processes: FSDP-sharded parameters (what the project does) against tensor parallelism.

    python tools/bench_sharded_sampling.py [--sizes 25m,110m] [--prompts 16] [--prompt-tokens 32] [--new-tokens 32]

For every model size (random-init float32 Llamas, `SIZES`, saved as a Hugging Face folder) it runs
the same greedy decoding of the same prompts (random token ids, no stop token: every response is
--new-tokens long) three ways, each in its own launch, on this machine's CPU (gloo), one thread per
process (two processes use two cores, the whole copy one):

- whole: one process holding the whole model, all the prompts;
- fsdp: 2 processes (torchrun), the model from `inference_model.load_inference_model(...,
  model_shards=2)`: each rank holds half the weights and all-gathers every layer for each forward;
  each rank decodes half the prompts with `producers.sample.generate`, forwards in lockstep;
- tp: 2 processes, tensor parallelism (`torch.distributed.tensor.parallel.parallelize_module`):
  in every decoder layer q/k/v/gate/up are split by output (ColwiseParallel: each rank has half the
  heads and half the MLP) and o/down by input (RowwiseParallel: one all-reduce of the hidden state
  each); the embedding is split by vocabulary (an all-reduce) and the head by vocabulary with its
  logits gathered. Both ranks decode all the prompts with the same `generate`; each rank's KV cache
  holds its own heads. Its weights are read, as the project's, rank slice by rank slice from the
  safetensors files (`model.materialize_weights`).

It prints, per run: tokens decoded per second (all the prompts' new tokens over the slowest rank's
time, prefill included; the fastest of --rounds, after a short warm-up); every rank's resident
memory before the model was built (the runtime: torch, transformers, the process group) and once it
is loaded, and its peak (VmHWM) while loading (the mapped safetensors pages count) and while
decoding (the peak is reset once the model is loaded); the weight bytes a rank holds; the bytes a
rank sends per decode step (computed; ring collectives: an all-gather sends (W-1)/W of the gathered
tensor, an all-reduce 2(W-1)/W of the reduced one); and how many responses differ from the whole
model's (greedy, float32: a sum split over ranks rounds differently, so a token whose two best
logits are that close could change).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpo_dist.benchmark import REPO, first_error_line, subprocess_env
from mpo_dist.cli import run_main, tool_parser
from mpo_dist.errors import InputError

# name -> (vocab, hidden, layers, heads, kv heads, MLP width): 64-wide heads, untied embeddings.
SIZES = {"25m": (8000, 512, 6, 8, 4, 1376), "110m": (24000, 768, 12, 12, 4, 2048)}
VARIANTS = {"whole": 1, "fsdp": 2, "tp": 2}  # variant -> processes
# glibc's malloc keeps freed blocks of up to 32 MiB in its heap once blocks that size were freed, so a
# CPU process's peak would grow by memory no tensor holds; a pinned threshold returns them (as
# tools/bench_plan_memory.py does).
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# One thread per process, the whole copy's too: two OpenMP threads on a machine whose cores other work
# also wants wait for each other at every operation (10x slower here under load), which would
# measure the neighbours, not the sampling.
THREADS = 1


def model_config(size: str) -> dict:
    vocab, hidden, layers, heads, kv_heads, mlp = SIZES[size]
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save_model(size: str, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = model_config(size)
    torch.manual_seed(0)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(folder))


def bytes_sent_per_step(variant: str, size: str, batch: int, world: int, element: int = 4) -> int:
    """Bytes one rank sends per decode step (one new token per row): FSDP all-gathers every weight;
    TP all-reduces the hidden state after attention and after the MLP of each layer and after the
    embedding, and all-gathers the logits of the head."""
    vocab, hidden, layers, heads, kv_heads, mlp = SIZES[size]
    if variant == "whole":
        return 0
    if variant == "fsdp":
        head_dim = hidden // heads
        layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * mlp + 2 * hidden
        weights = layers * layer + 2 * vocab * hidden + hidden
        return weights * element * (world - 1) // world
    all_reduce = 2 * (world - 1) * batch * hidden * element // world
    return (2 * layers + 1) * all_reduce + (world - 1) * batch * vocab * element // world


# ------------------------------------------------------------------ one rank of one run


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _reset_peak() -> None:
    """Start VmHWM again from the current resident set (Linux >= 4.0), so the next peak is the decoding's
    alone: reading the safetensors files maps them, and their pages count while loading."""
    Path("/proc/self/clear_refs").write_text("5")


def _tensor_parallel_model(folder: str, config, mesh):
    import torch
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from mpo_dist.model import build_model_from_config, decoder_layers, materialize_weights

    lm = build_model_from_config(config, torch.float32)  # meta device
    lm.requires_grad_(False)
    layer_plan = {name: ColwiseParallel() for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                        "mlp.gate_proj", "mlp.up_proj")}
    layer_plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.down_proj": RowwiseParallel()})
    for layer in decoder_layers(lm):
        parallelize_module(layer, mesh, layer_plan)
    # The vocabulary-sized tensors too, so that a rank holds half of every weight, as under FSDP.
    parallelize_module(lm, mesh, {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
                                  "lm_head": ColwiseParallel(output_layouts=Replicate())})
    assert all(p.placements[0] in (Shard(0), Shard(1)) for p in lm.parameters() if p.dim() == 2)
    materialize_weights(lm, folder, torch.device("cpu"), option="--model")
    return lm.eval()


def rank_main(args, info) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from mpo_dist.inference_model import load_inference_model
    from mpo_dist.model import read_model_config
    from mpo_dist.producers.sample import SamplingParams, generate

    device = torch.device("cpu")
    rss_before = _memory_kib("VmRSS")
    config = read_model_config(args.model, "--model")
    if args.variant == "tp":
        from torch.distributed.device_mesh import init_device_mesh

        model = _tensor_parallel_model(args.model, config, init_device_mesh("cpu", (info.world_size,), mesh_dim_names=("tp",)))
    else:
        model = load_inference_model(args.model, config, "float32", device, info, model_shards=info.world_size,
                                     option="--model")
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, size=args.prompt_tokens).astype(np.int64) for _ in range(args.prompts)]
    mine = list(range(len(prompts)))
    if args.variant == "fsdp":  # each rank its own contiguous share of the prompts
        share = len(prompts) // info.world_size
        mine = mine[info.rank * share : (info.rank + 1) * share]

    def run(indices: list[int], new_tokens: int) -> list:  # greedy, no stop token: every response new_tokens long
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
        return generate(model, [prompts[i] for i in indices], [0] * len(indices), params, None, 0, device)

    load_peak, loaded = _memory_kib("VmHWM"), _memory_kib("VmRSS")
    _reset_peak()
    run(mine[:2], 2)  # warm-up: first-call costs (allocations, kernels) out of the timing
    seconds = []
    for _ in range(args.rounds):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        results = run(mine, args.new_tokens)
        if dist.is_initialized():
            dist.barrier()
        seconds.append(time.perf_counter() - start)
    if hasattr(model, "finish"):
        model.finish()
    report = {"rank": info.rank, "world": info.world_size, "indices": mine, "seconds": min(seconds),
              "tokens": [response.tolist() for response, _ in results], "held_bytes": held,
              "rss_before_kib": rss_before, "load_peak_kib": load_peak, "loaded_kib": loaded,
              "peak_kib": _memory_kib("VmHWM"), "threads": torch.get_num_threads()}
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(report))


# ------------------------------------------------------------------ the launches and the table


def launch(variant: str, model_dir: Path, out: Path, args) -> tuple[list[dict], str]:
    """Run one variant; each rank's report (by rank) and the first error line ('' when it succeeded)."""
    from mpo_dist.launcher import launch_command

    out.mkdir(parents=True, exist_ok=True)
    processes = VARIANTS[variant]
    target = [str(REPO / "tools" / "bench_sharded_sampling.py"), "--variant", variant, "--model", str(model_dir),
              "--out", str(out), "--prompts", args.prompts, "--prompt-tokens", args.prompt_tokens,
              "--new-tokens", args.new_tokens, "--rounds", args.rounds]
    command = [sys.executable, *target] if processes == 1 else launch_command(processes, target)
    env = {**subprocess_env(threads=THREADS), **ALLOCATOR}
    result = subprocess.run([str(part) for part in command], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=args.run_timeout)
    if result.returncode != 0:
        return [], first_error_line(result.stdout + result.stderr)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)], ""


def summarize(size: str, variant: str, reports: list[dict], whole: dict[int, list[int]] | None, args) -> dict:
    mib = 2**20
    responses = {}
    for report in reports:
        responses.update(zip(report["indices"], report["tokens"]))
    differ = None if whole is None else sum(responses[i] != whole[i] for i in whole)
    seconds = max(report["seconds"] for report in reports)
    batch_per_rank = len(reports[0]["indices"])
    return {"size": size, "variant": variant, "processes": len(reports),
            "tokens_per_s": args.prompts * args.new_tokens / seconds, "seconds": seconds,
            "peak_mib": [report["peak_kib"] / 1024 for report in reports],
            "load_peak_mib": [report["load_peak_kib"] / 1024 for report in reports],
            "before_mib": [report["rss_before_kib"] / 1024 for report in reports],
            "loaded_mib": [report["loaded_kib"] / 1024 for report in reports],
            "held_mib": reports[0]["held_bytes"] / mib,
            "sent_mib_per_step": bytes_sent_per_step(variant, size, batch_per_rank, len(reports)) / mib,
            "differ": differ, "responses": responses}


def mib_list(values: list[float]) -> str:
    return ", ".join(f"{value:,.0f}" for value in values)


def format_rows(rows: list[dict]) -> str:
    lines = ["| model | variant | processes | tokens/s | RSS per rank (MiB): before the model | loaded | peak loading "
             "| peak decoding | weights held per rank (MiB) | sent per rank per decode step (MiB) "
             "| responses unlike whole |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['size']} | {row['variant']} | {VARIANTS[row['variant']]} | failed: {row['error']} "
                         "| | | | | | | |")
            continue
        differ = "-" if row["differ"] is None else f"{row['differ']} of {len(row['responses'])}"
        lines.append(f"| {row['size']} | {row['variant']} | {row['processes']} | {row['tokens_per_s']:,.0f} "
                     f"| {mib_list(row['before_mib'])} | {mib_list(row['loaded_mib'])} | {mib_list(row['load_peak_mib'])} "
                     f"| {mib_list(row['peak_mib'])} "
                     f"| {row['held_mib']:,.0f} | {row['sent_mib_per_step']:,.3f} | {differ} |")
    return "\n".join(lines)


def bench(args) -> None:
    sizes, variants = args.sizes.split(","), args.variants.split(",")
    unknown = [s for s in sizes if s not in SIZES] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise InputError(f"unknown size or variant: {', '.join(unknown)}")
    if args.prompts < 2 or args.prompts % 2:
        raise InputError(f"--prompts {args.prompts}: must be even and >= 2 (the fsdp run gives each of 2 ranks half)")
    for flag, value in (("--prompt-tokens", args.prompt_tokens), ("--new-tokens", args.new_tokens), ("--rounds", args.rounds)):
        if value < 1:
            raise InputError(f"{flag} {value}: must be >= 1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sharded_sampling-") as tmp:
        for size in sizes:
            model_dir = Path(tmp) / size
            save_model(size, model_dir)
            whole = None
            for variant in ["whole"] + [v for v in variants if v != "whole"]:
                reports, error = launch(variant, model_dir, Path(tmp) / f"{size}-{variant}", args)
                if error:
                    rows.append({"size": size, "variant": variant, "error": error})
                else:
                    rows.append(summarize(size, variant, reports, whole, args))
                    whole = rows[-1]["responses"] if variant == "whole" else whole
                print(format_rows(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_rows([row for row in rows if row["variant"] in variants]))


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--sizes", default="25m,110m", help=f"model sizes, comma-separated: {', '.join(SIZES)}")
    parser.add_argument("--variants", default="whole,fsdp,tp", help=f"runs, comma-separated: {', '.join(VARIANTS)} "
                        "(whole always runs: the others' tokens are compared with it)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts decoded in all, whatever the processes")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per prompt (greedy, no stop token)")
    parser.add_argument("--rounds", type=int, default=1, help="timed decodings per run (after a short warm-up); the fastest counts")
    parser.add_argument("--run-timeout", type=float, default=300, help="seconds before a run is stopped")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="",
                        help="(internal) run one variant as this process's rank")
    parser.add_argument("--model", default="", help="(internal, with --variant) the model folder")
    parser.add_argument("--out", default="", help="(internal, with --variant) the folder for each rank's report")
    args = parser.parse_args(argv)
    if args.variant:
        return run_main("bench_sharded_sampling", lambda info: rank_main(args, info))
    os.environ.update(ALLOCATOR)
    return run_main("bench_sharded_sampling", lambda info: bench(args))


if __name__ == "__main__":
    sys.exit(main())
