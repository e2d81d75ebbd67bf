"""The attention paths side by side: dense mask, varlen pieces and FlexAttention, on padded and packed rows.

    python tools/bench_attention.py [--device cuda|cpu] [--paths dense,varlen,flex] [--layouts padded,packed]
        [--workload 1b|tiny] [--prompt 256] [--response 256] [--pairs 32] [--pairs-per-batch 4]
        [--pack-pairs 4] [--warmup 2] [--repeats 3] [--json PATH]

Every (path, layout) runs the trainer's log-prob entry, `mpo_dist.logprobs.token_logprobs`, with
the model switched to the path as model.attention does (mpo_dist/attention.py) and the documents
laid out as data.packing=never (padded) or always (packed) does (mpo_dist/data/layout.py): pairs
(a prompt, chosen and rejected) each with one D_ref sample of its prompt, `--pairs-per-batch` pairs
per micro-batch, packed rows of up to `--pack-pairs` longest pairs' positions. Lengths are uniform
between half and all of --prompt and --response, the same in every micro-batch (one shape per
path, so a compiled kernel is built once). What the code cannot run is reported as skipped, with
the reason: the varlen and flex paths serve packed rows only (padded rows run SDPA with their
padding mask on every path), and a path the checkout lacks.

Per (path, layout):

- equality, on the first micro-batch: the largest difference of a per-token log-prob from the
  dense path's on the same layout (for the dense path of packed rows: from padded rows), and the
  relative difference of all parameter gradients of the mean log-prob, |g - g_dense| / |g_dense|
  (L2 over every parameter); `within_tolerance` holds both to the dtype's TOLERANCE. A path
  without a backward on the device (FlexAttention on CPU in torch 2.13) runs forward only and
  says so (`mode`, `forward_only_why`).
- speed: tokens/s of forward + backward over all micro-batches (tokens as data: prompt + response
  per sequence, as the trainer counts them), the median of `--repeats` passes after `--warmup`
  (compilation included), every (path, layout) once per round so that noise falls on all alike;
  also the trainer's model FLOPs (flops.CostModel.training_flops) per second and, on a GPU with a
  known datasheet peak, MFU.
- peak memory of a pass: on CUDA the allocator's peak (torch.cuda.max_memory_allocated) and its
  rise above the start of the pass (the parameters); on CPU the process's peak resident memory
  (VmHWM, reset before each pass) and its rise, which misses memory glibc keeps from an earlier
  pass (MALLOC_MMAP_THRESHOLD_=65536 returns it, at a cost in speed).

Defaults by device: on CUDA a random-init Llama of mpo_dist/benchmark.py's `1b` workload's shape
(Llama-3.2-1B) in bf16, prompts and responses of up to 256 tokens, 32 pairs, 4 per micro-batch;
varlen runs torch's flash `varlen_attn`, flex the compiled FlexAttention kernel, dense SDPA under
the 4-D mask. On CPU the `tiny` workload's model in float32 and a few short pairs, where varlen
and flex run their plain-PyTorch twins (flex forward only): its figures check the code, not a GPU.
The model is built in the process (nothing downloaded or saved).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mpo_dist import attention
from mpo_dist.benchmark import WORKLOADS, bench_device_type
from mpo_dist.cli import run_main, tool_parser
from mpo_dist.data.layout import Document, ModelInput, lay_out
from mpo_dist.errors import InputError
from mpo_dist.flops import CostModel, known_peak_tflops
from mpo_dist.logprobs import token_logprobs
from mpo_dist.model import build_model_from_config
from mpo_dist.process_memory import read_status_bytes

PATHS = ("dense", "varlen", "flex")
LAYOUTS = ("padded", "packed")
LAYOUT_PACKING = {"padded": "never", "packed": "always"}  # --layouts -> data.packing
SIZES = {
    "cuda": dict(workload="1b", prompt=256, response=256, pairs=32, pairs_per_batch=4, pack_pairs=4, warmup=2, repeats=3),
    "cpu": dict(workload="tiny", prompt=32, response=48, pairs=4, pairs_per_batch=2, pack_pairs=2, warmup=0, repeats=2),
}
# Per dtype: the largest per-token log-prob difference and relative gradient difference a path may
# show against the dense path. float32: the paths differ in summation order only (1e-6 measured on
# CPU). bf16: every layer's output is rounded to 8 bits of mantissa, differently by each kernel;
# tests/test_cuda.py measured up to 0.04 a token against float32 on a 2-layer model, and a 16-layer
# model adds more, so a path is held to 0.25 a token (log-probs of a random-init model spread with
# a standard deviation near 1, reported as `logps_std`: a wrong mask moves them by that much) and
# 5% on the gradient.
TOLERANCE = {"float32": {"logps": 1e-4, "grad": 1e-4}, "bfloat16": {"logps": 0.25, "grad": 0.05}}


class PathUnavailable(Exception):
    """This checkout cannot run the path on this layout (the message says why)."""


# ---------------------------------------------------------------------------------- selecting a path
# The one place that knows how each attention path is chosen (attention.py, data/layout.py).


def use_path(model, path: str) -> None:
    """Run `model` under attention `path` from now on, as the trainer sets model.attention's path."""
    if path not in attention.ATTENTION_PATHS:
        raise PathUnavailable(f"mpo_dist/attention.py has no {path} path (it has {', '.join(attention.ATTENTION_PATHS)})")
    attention.use_packed_attention(model, path)


def lay_out_for(path: str, layout: str, documents: list[Document], pack_tokens: int, cost: CostModel) -> ModelInput:
    """`documents` laid out as `layout` for attention `path`, on the host, as the trainer's data pipeline does."""
    inputs = lay_out(documents, packing=LAYOUT_PACKING[layout], pad_token_id=0, cost=cost.layout_cost,
                     pack_tokens=pack_tokens, varlen=path == "varlen")
    if path != "dense" and not inputs.packed:
        raise PathUnavailable(f"model.attention={path} serves packed rows only: padded rows run SDPA with their "
                              "padding mask, as on the dense path")
    return inputs


# ---------------------------------------------------------------------------------- the workload


def micro_batches(rng: np.random.Generator, size: dict, vocab: int) -> list[list[Document]]:
    """`size["pairs"]` pairs in micro-batches of `size["pairs_per_batch"]`, each pair with one D_ref sample
    of its prompt (output sequences: chosen 2i, rejected 2i + 1, D_ref 2 * pairs + i). Lengths are
    uniform in [half, all] of the prompt and response sizes, drawn once and reused by every
    micro-batch (the tokens differ), so each path meets one shape: a compiled kernel is built once."""
    pairs = size["pairs_per_batch"]
    lengths = {name: rng.integers(max(1, size[kind] // 2), size[kind] + 1, size=pairs)
               for name, kind in (("prompt", "prompt"), ("chosen", "response"), ("rejected", "response"), ("dref", "response"))}

    def tokens(name: str, i: int) -> np.ndarray:
        return rng.integers(3, vocab, size=int(lengths[name][i])).astype(np.int64)

    batches = []
    for _ in range(-(-size["pairs"] // pairs)):
        prompts = [tokens("prompt", i) for i in range(pairs)]
        batches.append([Document(p, [(2 * i, tokens("chosen", i)), (2 * i + 1, tokens("rejected", i))])
                        for i, p in enumerate(prompts)]
                       + [Document(p, [(2 * pairs + i, tokens("dref", i))]) for i, p in enumerate(prompts)])
    return batches


def build_model(workload: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """A random-init Llama of the workload's shape on `device`, as the trainer builds it (no dropout,
    the log-prob method)."""
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    with contextlib.redirect_stderr(io.StringIO()):
        return build_model_from_config(LlamaConfig(**workload["model"]), dtype, device)


# ---------------------------------------------------------------------------------- measuring


def peak_memory_start(device: torch.device) -> int | None:
    """Reset the peak mark; returns the memory in use now (allocated on CUDA, resident on CPU; None
    where the kernel lets no process reset its peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark := the current RSS
    except OSError:
        return None
    return read_status_bytes(os.getpid(), ("VmRSS",))["VmRSS"]


def peak_memory_end(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return read_status_bytes(os.getpid(), ("VmHWM",))["VmHWM"]


def peak_figures(peaks: list[tuple[int, int | None]]) -> dict:
    """The highest peak of the timed passes, and the highest rise above a pass's start."""
    measured = [(peak, start) for peak, start in peaks if start is not None]
    if not measured:
        return {"peak_bytes": None, "peak_above_start_bytes": None}
    return {"peak_bytes": max(peak for peak, _ in measured), "peak_above_start_bytes": max(max(p - s for p, s in measured), 0)}


def forward_backward(model, inputs: ModelInput, backward: bool) -> torch.Tensor:
    """The per-token log-probs (detached); with `backward`, the mean log-prob's gradients in .grad."""
    model.zero_grad(set_to_none=True)
    if not backward:
        with torch.no_grad():
            return token_logprobs(model, inputs)
    logps = token_logprobs(model, inputs)
    logps.mean().backward()
    return logps.detach()


def canonical(logps: torch.Tensor, inputs: ModelInput) -> torch.Tensor:
    """Per-token log-probs by output sequence, each sequence's tokens in order: the same order in every layout."""
    return logps[torch.argsort(inputs.sequence_index, stable=True)].float().cpu()


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def grad_relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    if got.keys() != want.keys():
        raise RuntimeError(f"gradients of other parameters: {sorted(got.keys() ^ want.keys())[:3]}")
    squared_diff = sum(float((got[n].float() - want[n].float()).pow(2).sum()) for n in want)
    squared_norm = sum(float(want[n].float().pow(2).sum()) for n in want)
    return (squared_diff / squared_norm) ** 0.5 if squared_norm else float(squared_diff > 0)


class Configuration:
    """One (path, layout): its micro-batches on the device and what was measured."""

    def __init__(self, path: str, layout: str):
        self.path, self.layout = path, layout
        self.batches: list[ModelInput] = []
        self.backward = True
        self.row: dict = {"path": path, "layout": layout, "status": "ok"}
        self.seconds: list[float] = []
        self.peaks: list[tuple[int, int]] = []

    @property
    def name(self) -> str:
        return f"{self.path} {self.layout}"

    def fail(self, status: str, why: str) -> None:
        self.row.update(status=status, why=why)
        self.batches = []


def compare_with_dense(model, config: Configuration, references: dict) -> None:
    """The first micro-batch's log-probs and gradients on `config`'s path, against the dense path's
    (`references`, per layout, filled by the dense configurations, which come first)."""
    first = config.batches[0]
    try:
        logps = forward_backward(model, first, backward=True)
    except NotImplementedError as error:  # no backward on this device (FlexAttention on CPU)
        config.backward = False
        config.row["forward_only_why"] = str(error)
        logps = forward_backward(model, first, backward=False)
    config.row["mode"] = "forward+backward" if config.backward else "forward"
    logps, grads = canonical(logps, first), gradients(model) if config.backward else None
    model.zero_grad(set_to_none=True)
    if config.path == "dense":
        references[config.layout] = (logps, grads)
    reference_layout = "padded" if config.path == "dense" else config.layout
    if (config.path, config.layout) != ("dense", "padded") and reference_layout in references:
        want, want_grads = references[reference_layout]
        config.row.update(reference=f"dense {reference_layout}", logps_max_abs_diff=float((logps - want).abs().max()),
                          logps_std=float(want.std()),
                          grad_relative_diff=grad_relative_difference(grads, want_grads) if grads is not None else None)


def measure(model, device: torch.device, dtype_name: str, batches: list[list[Document]], paths: list[str],
            layouts: list[str], pack_tokens: int, warmup: int, repeats: int, log) -> list[dict]:
    cost = CostModel.of(model)
    configs = [Configuration(path, layout) for path in paths for layout in layouts]
    references: dict[str, tuple[torch.Tensor, dict | None]] = {}  # per layout: the dense path's first micro-batch

    # Lay out, move to the device, compare on the first micro-batch (dense first: the others' reference).
    for config in sorted(configs, key=lambda c: (c.path != "dense", c.layout != "padded")):
        try:
            use_path(model, config.path)
            laid_out = [lay_out_for(config.path, config.layout, documents, pack_tokens, cost) for documents in batches]
            config.row.update(tokens=sum(b.num_tokens for b in laid_out), positions=sum(b.num_positions for b in laid_out),
                              real_positions=sum(b.num_real_positions for b in laid_out),
                              model_flops=sum(cost.training_flops(b) for b in laid_out),
                              batch_shape=list(laid_out[0].input_ids.shape))  # rows x width, every micro-batch's
            config.batches = [b.to(device) for b in laid_out]
            compare_with_dense(model, config, references)
        except PathUnavailable as why:
            config.fail("skipped", str(why))
        except Exception as error:  # one path's failure must not lose the others' figures
            config.fail("failed", f"{type(error).__name__}: {error}")
        log(f"bench_attention: {config.name}: {config.row['status']}"
            + (f" ({config.row['why']})" if "why" in config.row else ""))

    references.clear()  # (on a GPU, two copies of every gradient)

    def one_pass(config: Configuration) -> None:
        use_path(model, config.path)
        for batch in config.batches:
            forward_backward(model, batch, config.backward)
        model.zero_grad(set_to_none=True)

    def timed_pass(config: Configuration) -> None:
        start_bytes = peak_memory_start(device)
        started = time.perf_counter()
        one_pass(config)
        peak = peak_memory_end(device)  # (after a synchronize on CUDA)
        config.seconds.append(time.perf_counter() - started)
        config.peaks.append((peak, start_bytes))

    # Warmup (kernels chosen, compiled code built), then rounds of every configuration once each.
    for passes, body in ((warmup, one_pass), (repeats, timed_pass)):
        for _ in range(passes):
            for config in [config for config in configs if config.batches]:
                try:
                    body(config)
                except Exception as error:
                    config.fail("failed", f"{type(error).__name__}: {error}")
                    log(f"bench_attention: {config.name}: failed ({config.row['why']})")

    peak_flops = known_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    for config in configs:
        row = config.row
        if config.seconds:
            seconds = statistics.median(config.seconds)
            flops = row["model_flops"] / (1 if config.backward else 3)  # a forward is a third of forward + backward
            row.update(seconds_median=seconds, seconds=config.seconds, tokens_per_s=row["tokens"] / seconds,
                       model_tflops_per_s=flops / seconds / 1e12,
                       mfu_card=flops / seconds / (peak_flops * 1e12) if peak_flops else None,
                       **peak_figures(config.peaks))
        if "logps_max_abs_diff" in row:
            tolerance = TOLERANCE[dtype_name]
            row["within_tolerance"] = row["logps_max_abs_diff"] <= tolerance["logps"] and (
                row["grad_relative_diff"] is None or row["grad_relative_diff"] <= tolerance["grad"])
    return [config.row for config in configs]


# ---------------------------------------------------------------------------------- main


def bench(args, log) -> dict:
    device = torch.device(args.device or bench_device_type())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no GPU is visible")
    size = {**SIZES[device.type], **{key: getattr(args, key) for key in SIZES["cpu"] if getattr(args, key) is not None}}
    workload = WORKLOADS[size["workload"]]
    dtype_name = args.dtype or workload["dtype"]
    if dtype_name not in TOLERANCE:
        raise InputError(f"--dtype: {dtype_name!r} is not one of {', '.join(TOLERANCE)}")
    paths, layouts = _choices(args.paths, PATHS, "--paths"), _choices(args.layouts, LAYOUTS, "--layouts")
    if "dense" not in paths:
        raise InputError("--paths: dense is the reference of the equality figures; keep it")
    small = [key for key in ("prompt", "response", "pairs", "pairs_per_batch", "pack_pairs", "repeats") if size[key] < 1]
    if small or size["warmup"] < 0:
        raise InputError(f"{', '.join('--' + key.replace('_', '-') for key in small) or '--warmup'} must be at least "
                         f"{1 if small else 0}")
    pack_tokens = size["pack_pairs"] * (size["prompt"] + 2 * size["response"])
    started = time.monotonic()
    model = build_model(workload, device, getattr(torch, dtype_name), args.seed)
    batches = micro_batches(np.random.default_rng(args.seed), size, workload["model"]["vocab_size"])
    log(f"bench_attention: {size['workload']} model on {device} in {dtype_name} ({time.monotonic() - started:.0f}s)")
    rows = measure(model, device, dtype_name, batches, paths, layouts, pack_tokens, size["warmup"], size["repeats"], log)
    return {"header": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                       "device_type": device.type, "torch": torch.__version__, "dtype": dtype_name, **size,
                       "pack_tokens": pack_tokens,
                       "dref_per_pair": 1, "tolerance": TOLERANCE[dtype_name],
                       "memory": "CUDA allocated" if device.type == "cuda" else "process resident (VmHWM)",
                       "seconds": round(time.monotonic() - started, 1)},
            "rows": rows}


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [item for item in text.split(",") if item]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise InputError(f"{flag}: {', '.join(unknown) or 'nothing'} given; choose from {', '.join(allowed)}")
    return chosen


def format_rows(result: dict) -> str:
    """A plain-text table of a result (what the tool prints)."""
    lines = [f"{'path':<7} {'layout':<7} {'status':<8} {'mode':<17} {'tokens/s':>10} {'peak MiB':>9} "
             f"{'max |dlogp|':>11} {'grad rel':>9}"]
    for row in result["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['path']:<7} {row['layout']:<7} {row['status']:<8} {row.get('why', '')}")
            continue

        def number(key: str, spec: str, scale: float = 1.0) -> str:
            return "-" if row.get(key) is None else format(row[key] * scale, spec)

        lines.append(f"{row['path']:<7} {row['layout']:<7} {row['status']:<8} {row.get('mode', ''):<17} "
                     f"{number('tokens_per_s', ',.0f'):>10} {number('peak_above_start_bytes', ',.0f', 2**-20):>9} "
                     f"{number('logps_max_abs_diff', '.2e'):>11} {number('grad_relative_diff', '.2e'):>9}")
    return "\n".join(lines)


def by_device(key: str) -> str:
    return f"default {SIZES['cuda'][key]} on CUDA, {SIZES['cpu'][key]} on CPU"


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="where to run; default: cuda when visible")
    parser.add_argument("--paths", default=",".join(PATHS), help="attention paths (model.attention), comma-separated")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="row layouts (data.packing never/always), comma-separated")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                        help=f"the model's shape (mpo_dist/benchmark.py); {by_device('workload')}")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default=None, help="default: the workload's")
    parser.add_argument("--prompt", type=int, default=None,
                        help=f"the longest prompt, tokens (lengths are uniform from half of it); {by_device('prompt')}")
    parser.add_argument("--response", type=int, default=None, help=f"the longest response; {by_device('response')}")
    parser.add_argument("--pairs", type=int, default=None,
                        help=f"pairs (each with one D_ref sample), rounded up to whole micro-batches; {by_device('pairs')}")
    parser.add_argument("--pairs-per-batch", type=int, default=None, help=f"pairs per micro-batch; {by_device('pairs_per_batch')}")
    parser.add_argument("--pack-pairs", type=int, default=None,
                        help=f"packed rows hold up to this many longest pairs' positions; {by_device('pack_pairs')}")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed passes per configuration; {by_device('warmup')}")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed passes per configuration; {by_device('repeats')}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's weights and the documents")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0: torch's default")
    parser.add_argument("--json", default=None, help="write the result here")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body(info) -> None:
        # FlexAttention off CUDA runs eagerly (flex.py): torch warns each process that this is unfused.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        result = bench(args, log=lambda message: print(message, file=sys.stderr, flush=True))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(format_rows(result))

    return run_main("bench_attention", body, threads=args.threads or None)


if __name__ == "__main__":
    sys.exit(main())
