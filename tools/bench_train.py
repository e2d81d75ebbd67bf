"""Training throughput: the trainer's real step in several configurations, alternating, in one run.

    python tools/bench_train.py [--config configs/tiny_cpu.yaml] [--set section.key=value ...]
        [--make-workload] [--workload tiny|1b] [--layouts padded,packed] [--dtypes float32,bfloat16]
        [--procs 2x1,1x2] [--recompute off,on] [--compile off,on] [--losses config] [--rounds 3]
        [--steps 30] [--log-interval 5] [--warmup-steps 5] [--work DIR] [--json PATH]

    python tools/bench_train.py --make-workload --work /tmp/bench --json bench.json   # the synthetic workload

Every configuration is a real training run, `python -m mpo_dist.launcher --standalone
--nproc-per-node P -m mpo_dist.train --config CONFIG ...` with OMP_NUM_THREADS=T, a fresh
job.output_dir, no held-out eval, no checkpoint but the one the trainer always writes after the
last step (outside every timed window), no export. A configuration is one value of each axis:
data layout (padded, packed: `data.packing`), `model.dtype`, processes x threads (PxT), the loss
(`config`: as configured), activation checkpointing and compile (`parallel.activation_checkpointing`,
`parallel.compile`; off unless asked, whatever the config says). A round runs every configuration once; R rounds alternate them, so that
noise from the rest of the machine falls on all of them alike. Per configuration the table gives
the best and the median over the rounds.

What is timed: the trainer logs every `--log-interval` steps (and at step 1) into
job.output_dir/metrics.jsonl, each line about the steps since the last one (a window). Windows
that begin at or before `--warmup-steps` are discarded (the first one also holds the loaders'
start); the rest, steps W+1..N, are summed: tokens/s = real tokens / seconds (D_ref rows included
for MPO), pairs/s = real pairs / seconds. A window's seconds are its steps times the trainer's
`throughput/seconds_per_step`; its tokens and pairs the differences of progress/tokens_seen and
progress/pairs_seen to the previous line (mpo_dist/metrics_file.py reads the file).

Per pair: real tokens (prompt + response per sequence, as data), positions the model computed
(`throughput/positions_per_pair`: padding included, a shared prompt once) and model FLOPs
(`throughput/flops_per_pair`: the trainer's count, mpo_dist/flops.py's CostModel.training_flops).

MFU, against a peak measured in the same run: the matmul peak of a PxT configuration is the summed
rate of P processes that each run a size x size matmul with T threads at the same time (started
together, in the configuration's dtype): what this machine's dense matmul reaches with every
thread the run uses busy. It is measured before the first round and after each, in short trials,
and the best trial counts (a trial during which other work took cores would understate it and
push MFU up, even past 100%). MFU = flops_per_pair x real pairs/s (all ranks) / that peak, by the
trainer's formula (flops.mfu); the best MFU uses the best pairs/s, the median the median. The FLOPs count the positions the
model computed, so MFU says how busy the arithmetic is; pairs/s says how much training gets done
(a layout that computes less padding has fewer FLOPs per pair, so it can show a lower MFU and
still train faster). It is relative to this machine's measured matmul, not a datasheet peak.

On a GPU (the trainer then runs each process on its own GPU with NCCL) the matmul peak is that of
P GPUs, each running 8192^2 matmuls (timed in bursts, each ended by a synchronize), in spawned
processes so the bench itself holds no GPU memory; "MFU card" is against the card's datasheet dense
bf16 peak (mpo_dist.flops.KNOWN_PEAK_TFLOPS) times P, "GPU MiB" rank 0's peak GPU memory allocated
to tensors (the trainer's memory/peak_gib) and "GPU rsv MiB" the peak held by PyTorch's caching
allocator (memory/peak_reserved_gib; neither counts the CUDA context or NCCL's buffers). These
columns are left out on CPU.

Peak memory: mpo_dist.process_memory.ProcessTreeMonitor polls the launcher's process tree (VmHWM
of the launcher, each rank and each rank's workers); the table shows the highest rank and the
total of all processes' peaks, the JSON every process.

--make-workload writes mpo_dist/benchmark.py's synthetic workload (`--workload tiny`: a 4-layer
Llama, or `1b`: Llama-3.2-1B's shape in bf16, for a GPU; random-init, random token ids) under --work
and trains on it: 8 pairs per step (4 per micro-batch) for tiny, 16 (8) for 1b, DPO; for an `mpo`
loss configuration (tau 0.05) as many D_ref rows per micro-batch as pairs, one sample per prompt as
long as a response. Its default losses are dpo and mpo. Scoring and sampling take a few minutes on
2 CPU cores: give --work to keep the workload for the next run.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from mpo_dist import metric_names as names
from mpo_dist.benchmark import (DTYPE_SHORT, MPO_TAU, NO_EVAL, REPO, WORKLOADS, bench_device_type, first_error_line,
                                make_workload, subprocess_env)
from mpo_dist.cli import run_main, tool_parser
from mpo_dist.errors import INPUT_ERROR_EXIT_CODE, InputError
from mpo_dist.flops import known_peak_tflops, mfu
from mpo_dist.launcher import train_command
from mpo_dist.metrics_file import METRICS_FILE, read_metrics, training_records

LOSSES = ("config", "dpo", "ipo", "mpo")


# ---------------------------------------------------------------------------------- configurations


LAYOUT_PACKING = {"padded": "never", "packed": "always", "auto": "auto"}  # --layouts -> data.packing

@dataclass(frozen=True)
class BenchConfig:
    layout: str  # padded | packed
    dtype: str  # float32 | bfloat16
    processes: int
    threads: int
    loss: str  # config | dpo | ipo | mpo
    recompute: bool = False  # parallel.activation_checkpointing
    compiled: bool = False  # parallel.compile
    baseline: bool = False  # the trainer of the --baseline checkout, not this one

    @property
    def name(self) -> str:
        loss = "" if self.loss == "config" else f" {self.loss}"
        extras = "".join(f" {word}" for word, on in (("recompute", self.recompute), ("compile", self.compiled),
                                                      ("baseline", self.baseline)) if on)
        return f"{self.layout} {DTYPE_SHORT.get(self.dtype, self.dtype)} {self.processes}x{self.threads}{loss}{extras}"

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-")

    def overrides(self, config_tau: float) -> list[str]:
        """The trainer overrides that make this configuration (after the user's --set)."""
        out = [f"model.dtype={self.dtype}", f"parallel.activation_checkpointing={str(self.recompute).lower()}",
               f"parallel.compile={str(self.compiled).lower()}", f"data.packing={LAYOUT_PACKING[self.layout]}"]
        if self.loss in ("dpo", "ipo"):
            out += [f"loss.name={self.loss}", "loss.tau=0", "loss.label_smoothing=0"]
        elif self.loss == "mpo":
            out += ["loss.name=mpo", f"loss.tau={config_tau or MPO_TAU}", "loss.label_smoothing=0"]
        return out


def parse_procs(text: str) -> tuple[int, int]:
    """'2x1' -> (2 processes, 1 thread each)."""
    try:
        processes, threads = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--procs: {text!r} is not PROCESSESxTHREADS, e.g. 2x1") from None
    if processes < 1 or threads < 1:
        raise InputError(f"--procs: {text!r} needs at least 1 process and 1 thread")
    return processes, threads


def on_off(flag: str, text: str) -> list[bool]:
    """'off,on' -> [False, True] (an axis of a --recompute or --compile option)."""
    values = {"off": False, "on": True}
    for word in text.split(","):
        if word not in values:
            raise InputError(f"{flag}: {word!r} is not off or on")
    return [values[word] for word in text.split(",")]


def configurations(layouts: list[str], dtypes: list[str], procs: list[str], losses: list[str],
                   recompute: list[bool] = (False,), compiled: list[bool] = (False,), baseline: bool = False
                   ) -> list[BenchConfig]:
    """Every combination of the axes, in a fixed order (the order of each round); with `baseline`,
    each configuration followed by its twin run from the --baseline checkout."""
    for layout in layouts:
        if layout not in LAYOUT_PACKING:
            raise InputError(f"--layouts: {layout!r} is not one of {', '.join(LAYOUT_PACKING)}")
    for dtype in dtypes:
        if dtype not in DTYPE_SHORT:
            raise InputError(f"--dtypes: {dtype!r} is not float32 or bfloat16")
    for loss in losses:
        if loss not in LOSSES:
            raise InputError(f"--losses: {loss!r} is not one of {', '.join(LOSSES)}")
    return [BenchConfig(layout, dtype, *parse_procs(p), loss, ac, compile_, twin)
            for loss, layout, dtype, p, compile_, ac in itertools.product(losses, layouts, dtypes, procs, compiled, recompute)
            for twin in ((False, True) if baseline else (False,))]


# ---------------------------------------------------------------------------------- metrics windows


@dataclass
class Window:
    """The steps first_step..last_step as one metrics.jsonl record reports them (over all ranks)."""

    first_step: int
    last_step: int
    seconds: float  # throughput/seconds_per_step x the window's steps
    tokens: float  # real tokens (as data: a prompt counts once per response)
    pairs: float  # real pairs
    padding: float  # the fraction of computed positions that are padding
    positions_per_pair: float  # positions the model computed (padding included, a shared prompt once)
    flops_per_pair: float  # flops.CostModel.training_flops per real pair
    peak_gib: float | None  # memory/peak_gib (rank 0)
    peak_reserved_gib: float | None = None  # memory/peak_reserved_gib (rank 0, CUDA only)


def windows_of(records: list[dict]) -> list[Window]:
    """One Window per training record of a metrics.jsonl (metrics_file.training_records); counts are
    differences of the cumulative progress counters."""
    windows, previous = [], {"step": 0, names.TOKENS_SEEN: 0, names.PAIRS_SEEN: 0}
    for record in records:
        first_step = previous["step"] + 1
        windows.append(Window(
            first_step=first_step, last_step=record["step"],
            seconds=record[names.SECONDS_PER_STEP] * (record["step"] - first_step + 1),
            tokens=record[names.TOKENS_SEEN] - previous[names.TOKENS_SEEN],
            pairs=record[names.PAIRS_SEEN] - previous[names.PAIRS_SEEN], padding=record[names.PADDING],
            positions_per_pair=record[names.POSITIONS_PER_PAIR], flops_per_pair=record[names.FLOPS_PER_PAIR],
            peak_gib=record.get(names.PEAK_GIB), peak_reserved_gib=record.get(names.PEAK_RESERVED_GIB)))
        previous = record
    return windows


def timed(windows: list[Window], warmup_steps: int) -> list[Window]:
    """The windows that begin after the warm-up steps."""
    return [window for window in windows if window.first_step > warmup_steps]


def summarize(windows: list[Window]) -> dict:
    """Throughput, per-pair counts and FLOPs of the timed windows of one run (sums over the windows)."""
    if not windows:
        raise ValueError("no timed window")
    seconds, tokens, pairs = (sum(getattr(w, name) for w in windows) for name in ("seconds", "tokens", "pairs"))
    positions = sum(w.positions_per_pair * w.pairs for w in windows)
    real_positions = sum(w.positions_per_pair * w.pairs * (1 - w.padding) for w in windows)
    return {
        "timed_steps": [windows[0].first_step, windows[-1].last_step], "seconds": seconds, "pairs": pairs,
        "tokens_per_s": tokens / seconds, "pairs_per_s": pairs / seconds, "real_tokens_per_pair": tokens / pairs,
        "positions_per_pair": positions / pairs, "padding": 1 - real_positions / positions,
        "flops_per_pair": sum(w.flops_per_pair * w.pairs for w in windows) / pairs,
        "trainer_peak_gib": max((w.peak_gib for w in windows if w.peak_gib is not None), default=None),
        "trainer_peak_reserved_gib": max((w.peak_reserved_gib for w in windows if w.peak_reserved_gib is not None),
                                         default=None),
    }


def pairs_mfu(flops_per_pair: float, pairs_per_s: float, devices: int, peak_flops: float | None) -> float | None:
    """The trainer's MFU (flops.mfu) of `pairs_per_s` real pairs a second (all ranks) on `devices`
    whose peak is `peak_flops` FLOP/s each; None without a peak."""
    return mfu(flops_per_pair * pairs_per_s, 1.0, devices, peak_flops / 1e12) if peak_flops else None


# ---------------------------------------------------------------------------------- matmul peak


def _matmul_worker(index: int, device_type: str, threads: int, size: int, dtypes: list[str], trials: int, seconds: float,
                   barrier, results) -> None:
    import torch

    torch.set_num_threads(threads)
    device = torch.device(device_type, index) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)  # synchronize() waits on the current device
    # CUDA runs kernels asynchronously: time bursts of matmuls, each ended by a synchronize.
    burst = 8 if device_type == "cuda" else 1
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    rates = {}
    for dtype in dtypes:
        a = torch.randn(size, size, dtype=getattr(torch, dtype), device=device)
        b = torch.randn(size, size, dtype=getattr(torch, dtype), device=device)
        for _ in range(2 * burst):
            a @ b  # warm-up: thread pool or CUDA context, kernels, pages
        sync()
        rates[dtype] = []
        for _ in range(trials):
            barrier.wait()  # every process starts each trial together
            count, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                for _ in range(burst):
                    a @ b
                sync()
                count += burst
            rates[dtype].append(2 * size**3 * count / elapsed)
    name = torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu"
    results.put((rates, name))


def matmul_peak(processes: int, threads: int, dtypes: list[str], size: int = 2048, trials: int = 5,
                seconds: float = 0.5, device_type: str = "cpu") -> tuple[dict[str, float], str]:
    """FLOP/s per dtype of `processes` processes, each running `size` x `size` matmuls with `threads`
    threads (on CUDA: each on its own GPU, process i on cuda:i) at the same time, summed over the
    processes: the machine's dense-matmul rate with that many threads or GPUs busy. The best of
    `trials` trials of `seconds` each (all processes start each trial together), so that a moment
    when other work on the machine took cores does not set the peak. Also returns the device's name
    ("cpu", or the GPU's). The processes are spawned, so this process never holds a CUDA context."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the children's OpenMP pool, from their start
    try:
        workers = [context.Process(target=_matmul_worker,
                                   args=(index, device_type, threads, size, dtypes, trials, seconds, barrier, results))
                   for index in range(processes)]
        for worker in workers:
            worker.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    reports = []
    while len(reports) < processes:
        try:
            reports.append(results.get(timeout=1.0))
        except queue.Empty:
            if any(worker.exitcode not in (None, 0) for worker in workers):  # died before reporting
                for worker in workers:
                    worker.kill()
                raise RuntimeError("a matmul peak process failed (its traceback is above)") from None
    for worker in workers:
        worker.join()
    rates = [rate for rate, _ in reports]
    return {dtype: max(sum(rate[dtype][trial] for rate in rates) for trial in range(trials)) for dtype in dtypes}, reports[0][1]


# ---------------------------------------------------------------------------------- training runs


def training_command(config: BenchConfig, config_path: str, overrides: list[str], out_dir: Path, steps: int,
                     log_interval: int) -> list[str]:
    """The trainer's command line of one run (its threads: OMP_NUM_THREADS, subprocess_env)."""
    run = [*NO_EVAL, *overrides, f"training.steps={steps}", f"metrics.log_interval={log_interval}",
           f"job.output_dir={out_dir}", "checkpoint.interval=0", "checkpoint.keep=1", "checkpoint.resume=none",
           "checkpoint.export_hf=false", "checkpoint.keep_best=", "metrics.tensorboard=false"]
    return train_command(config_path, run, config.processes)


def run_training(command: list[str], env: dict[str, str], out_dir: Path, timeout: float) -> dict:
    """One training run with its process tree's peak memory; its metrics.jsonl training records, or an error."""
    from mpo_dist.process_memory import ProcessTreeMonitor

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "bench.log"
    start, timed_out = time.monotonic(), False
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        with ProcessTreeMonitor(launcher.pid, interval_s=0.2) as monitor:
            try:
                code = launcher.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                launcher.terminate()  # SIGTERM: torchrun stops its workers
                code, timed_out = launcher.wait(), True
    result = {"returncode": code, "wall_s": time.monotonic() - start, "log": str(log_path),
              "processes": [asdict(peak) for peak in monitor.peaks()]}
    if timed_out:
        result["error"] = f"stopped after --run-timeout {timeout:g}s"
    elif code != 0:
        result["error"] = first_error_line(log_path.read_text())
    elif (out_dir / METRICS_FILE).is_file():
        result["records"] = training_records(read_metrics(out_dir))
    else:
        result["error"] = f"no {METRICS_FILE} in {out_dir}"
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # the final checkpoint: not needed, maybe large
    return result


def memory_summary(processes: list[dict]) -> dict:
    ranks = [p["peak_bytes"] for p in processes if p["role"].startswith("rank ") and not p["role"].endswith("worker")]
    return {"max_rank_bytes": max(ranks, default=None), "total_bytes": sum(p["peak_bytes"] for p in processes)}


# ---------------------------------------------------------------------------------- report


def machine_header() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg()}


def config_result(config: BenchConfig, runs: list[dict], peaks: dict[str, float], card_peak_flops: float | None = None,
                  device_type: str = "cpu") -> dict:
    """Best and median over the successful rounds of one configuration. `card_peak_flops`: one GPU's
    datasheet bf16 peak, for the MFU against the card (P processes: P GPUs)."""
    good = [run["summary"] for run in runs if "summary" in run]
    out = {"name": config.name, "runs_ok": len(good), "runs": len(runs),
           "failures": [f"round {run['round']}: {run['error']}" for run in runs if "error" in run]}
    if not good:
        out["error"] = runs[0]["error"] if runs else "no run"
        return out
    tokens = [s["tokens_per_s"] for s in good]
    pairs = [s["pairs_per_s"] for s in good]
    flops_per_pair = statistics.median(s["flops_per_pair"] for s in good)
    peak = peaks.get(config.dtype)
    memory = [memory_summary(run["processes"]) for run in runs if "summary" in run]
    out.update(
        tokens_per_s_best=max(tokens), tokens_per_s_median=statistics.median(tokens),
        pairs_per_s_best=max(pairs), pairs_per_s_median=statistics.median(pairs),
        real_tokens_per_pair=statistics.median(s["real_tokens_per_pair"] for s in good),
        positions_per_pair=statistics.median(s["positions_per_pair"] for s in good),
        padding=statistics.median(s["padding"] for s in good),
        flops_per_pair=flops_per_pair, matmul_peak_flops=peak,
        # Against the matmul measured on all P processes at once (one device's worth of peak), and
        # against P cards' datasheet peak.
        mfu_best=pairs_mfu(flops_per_pair, max(pairs), 1, peak),
        mfu_median=pairs_mfu(flops_per_pair, statistics.median(pairs), 1, peak),
        card_peak_flops=card_peak_flops,
        mfu_card_median=pairs_mfu(flops_per_pair, statistics.median(pairs), config.processes, card_peak_flops),
        # The trainer's memory/peak_gib and peak_reserved_gib: rank 0's peak GPU memory allocated to
        # tensors and held by the caching allocator (on CPU the first is the rank's resident peak, which
        # the process-tree columns already show). Neither counts the CUDA context or NCCL's buffers.
        device_peak_bytes=_gpu_peak_bytes(good, "trainer_peak_gib", device_type),
        device_reserved_bytes=_gpu_peak_bytes(good, "trainer_peak_reserved_gib", device_type),
        max_rank_peak_bytes=max(m["max_rank_bytes"] or 0 for m in memory),
        total_peak_bytes=max(m["total_bytes"] for m in memory),
        timed_steps=good[0]["timed_steps"])
    return out


def _gpu_peak_bytes(summaries: list[dict], key: str, device_type: str) -> float | None:
    values = [summary.get(key) for summary in summaries]
    return max(values) * 2**30 if device_type == "cuda" and values and None not in values else None


def _fmt(value, spec: str, width: int) -> str:
    if value is None:
        return f"{'n/a':>{width}}"
    if spec == "si":  # 3 significant digits and a prefix: 35.7M, 10.6G, 6.12T
        exponent = min(max(int(math.floor(math.log10(abs(value)) / 3)) if value else 0, 0), 5)
        return f"{value / 1000**exponent:.3g}{' kMGTP'[exponent].strip()}".rjust(width)
    return f"{format(value, spec):>{width}}"


COLUMNS = [  # (heading, key, format, width, scale)
    ("tok/s best", "tokens_per_s_best", ",.0f", 10, 1), ("tok/s med", "tokens_per_s_median", ",.0f", 10, 1),
    ("pairs/s med", "pairs_per_s_median", ",.1f", 11, 1), ("real/pair", "real_tokens_per_pair", ",.0f", 9, 1),
    ("comp/pair", "positions_per_pair", ",.0f", 9, 1), ("pad", "padding", ".1%", 6, 1),
    ("FLOP/pair", "flops_per_pair", "si", 9, 1), ("MFU best", "mfu_best", ".1%", 8, 1),
    ("MFU med", "mfu_median", ".1%", 8, 1), ("MFU card", "mfu_card_median", ".1%", 8, 1),
    ("GPU MiB", "device_peak_bytes", ",.0f", 8, 2**-20), ("GPU rsv MiB", "device_reserved_bytes", ",.0f", 11, 2**-20),
    ("rank MiB", "max_rank_peak_bytes", ",.0f", 8, 2**-20),
    ("total MiB", "total_peak_bytes", ",.0f", 9, 2**-20),
]
OPTIONAL_COLUMNS = {"mfu_card_median", "device_peak_bytes", "device_reserved_bytes"}  # shown when some configuration has a value (GPU runs)


def format_table(results: list[dict]) -> str:
    width = max([len("configuration"), *(len(r["name"]) for r in results)])
    columns = [column for column in COLUMNS
               if column[1] not in OPTIONAL_COLUMNS or any(r.get(column[1]) is not None for r in results)]
    lines = [f"{'configuration':<{width}} " + " ".join(f"{heading:>{w}}" for heading, _, _, w, _ in columns)]
    for result in results:
        if "error" in result:
            lines.append(f"{result['name']:<{width}} failed: {result['error']}")
            continue
        cells = [_fmt(None if result.get(key) is None else result[key] * scale, spec, w) for _, key, spec, w, scale in columns]
        notes = []
        if result["failures"]:
            notes.append(f"{len(result['failures'])} of {result['runs']} runs failed, {result['failures'][0]}")
        lines.append(f"{result['name']:<{width}} " + " ".join(cells) + (f" ({'; '.join(notes)})" if notes else ""))
    return "\n".join(lines)


def baseline_ratios(configs: list[BenchConfig], runs: dict[BenchConfig, list[dict]]) -> list[dict]:
    """Per configuration run beside its --baseline twin: this checkout's tokens/s over the baseline's,
    round by round (the two ran one after the other, so machine drift falls on both alike)."""
    out = []
    for config in configs:
        if config.baseline:
            continue
        twin = runs.get(BenchConfig(**{**asdict(config), "baseline": True}))
        if twin is None:
            continue
        twins = {run["round"]: run for run in twin if "summary" in run}
        ratios = [run["summary"]["tokens_per_s"] / twins[run["round"]]["summary"]["tokens_per_s"]
                  for run in runs[config] if "summary" in run and run["round"] in twins]
        if ratios:
            out.append({"name": config.name, "ratios": ratios, "median": statistics.median(ratios)})
    return out


def format_ratios(ratios: list[dict], baseline: str) -> str:
    lines = [f"tokens/s of this checkout / --baseline {baseline}, per round (median; >1: this one is faster):"]
    lines += [f"  {r['name']}: {r['median']:.3f} (" + ", ".join(f"{x:.3f}" for x in r["ratios"]) + ")" for r in ratios]
    return "\n".join(lines)


def format_header(header: dict, args, peaks: dict[str, dict[str, float]], timed_steps: str) -> str:
    load = ", ".join(f"{value:.2f}" for value in header["load_average"])
    gpu = f" | GPU {header['device']}" if header.get("device", "cpu") != "cpu" else ""
    card = (f" | MFU card: against {header['card_peak_flops'] / 1e12:.0f} TFLOP/s bf16 per GPU (datasheet)"
            if header.get("card_peak_flops") else "")
    lines = [f"bench_train {header['date']} | CPU {header['cpu']}, {header['cores']} cores{gpu} | torch {header['torch']} | "
             f"load average at start {load}{card}",
             f"config {args.config}" + (" + synthetic workload (--make-workload)" if args.make_workload else "")
             + "".join(f" {item}" for item in args.set),
             f"{args.rounds} round{'s' if args.rounds > 1 else ''}, configurations alternating; {args.steps} steps per run, logged every "
             f"{args.log_interval}; timed: steps {timed_steps} "
             + (f"(steps 1-{args.warmup_steps} are warm-up)" if args.warmup_steps else "(no warm-up)"),
             f"matmul peak ({header['matmul_size']}^2, P processes x T threads (or GPUs) at once, the best of {args.matmul_trials} "
             f"trials x {args.rounds + 1} measurements, before the first round and after each): "
             + "; ".join(f"{procs} " + ", ".join(f"{DTYPE_SHORT[d]} {v / 1e12:.3f} TFLOP/s" for d, v in rates.items())
                         for procs, rates in peaks.items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_cpu.yaml"), help="the trainer's YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a trainer override for every run (repeat), e.g. model.path=DIR data.pairs=DIR")
    parser.add_argument("--make-workload", action="store_true",
                        help="build the synthetic workload (a random-init Llama and random pairs, see --workload) under --work and train on it")
    parser.add_argument("--workload", default="tiny", choices=sorted(WORKLOADS),
                        help="the --make-workload size: tiny (a 4-layer Llama, 256 pairs 64+128+128) or 1b (Llama-3.2-1B's "
                             "shape, 256 pairs 256+256+256, bf16)")
    parser.add_argument("--layouts", default="padded,packed", help="data layouts: padded, packed, auto (data.packing=never, always, auto)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="model.dtype values")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--procs", default=f"{cores}x1,1x{cores}" if cores > 1 else "1x1",
                        help="PROCESSESxTHREADS layouts (torchrun processes, OMP_NUM_THREADS each)")
    parser.add_argument("--recompute", default="off", help="activation checkpointing: off, on or off,on (parallel.activation_checkpointing)")
    parser.add_argument("--compile", default="off", help="torch.compile of the decoder layers: off, on or off,on (parallel.compile)")
    parser.add_argument("--losses", default=None,
                        help="losses: config (as configured), dpo, ipo, mpo; default config, or dpo,mpo with --make-workload")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every configuration, alternating")
    parser.add_argument("--steps", type=int, default=30, help="training.steps of each run")
    parser.add_argument("--log-interval", type=int, default=5, help="metrics.log_interval: steps per timed window")
    parser.add_argument("--warmup-steps", type=int, default=5, help="windows that begin at or before this step are not timed")
    parser.add_argument("--matmul-size", type=int, default=0, help="side of the square matmul of the peak; 0: 8192 on a GPU, else 2048")
    parser.add_argument("--matmul-trials", type=int, default=5, help="trials per matmul peak measurement (the best counts)")
    parser.add_argument("--matmul-seconds", type=float, default=0.5, help="seconds of each matmul peak trial")
    parser.add_argument("--work", default=None, help="folder for the runs (and the workload); default: a temporary folder, removed")
    parser.add_argument("--run-timeout", type=float, default=3600, help="seconds before a run is stopped")
    parser.add_argument("--json", default=None, help="write every raw number to this JSON file")
    parser.add_argument("--baseline", default=None, metavar="CHECKOUT",
                        help="another checkout of this project (e.g. `git worktree add /tmp/base COMMIT`): each configuration "
                             "also runs with its trainer, right after this one's in every round, and the table ends "
                             "with this checkout's tokens/s over the baseline's")
    args = parser.parse_args(argv)
    return run_main("bench_train", lambda info: bench(args))


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench(args) -> None:
    if args.rounds < 1 or args.steps < 1 or args.log_interval < 1 or args.warmup_steps < 0:
        raise InputError("--rounds, --steps and --log-interval must be >= 1, --warmup-steps >= 0")
    if args.warmup_steps + 1 > args.steps:
        raise InputError(f"--warmup-steps {args.warmup_steps} leaves no timed step of --steps {args.steps}")
    if not Path(args.config).is_file():
        raise InputError(f"--config {args.config} does not exist")
    args.config = str(Path(args.config).resolve())
    losses = (args.losses or ("dpo,mpo" if args.make_workload else "config")).split(",")
    if args.baseline:
        if not (Path(args.baseline) / "mpo_dist" / "train.py").is_file():
            raise InputError(f"--baseline {args.baseline} is not a checkout of mpo_dist (no mpo_dist/train.py there)")
        args.baseline = str(Path(args.baseline).resolve())
    configs = configurations(args.layouts.split(","), args.dtypes.split(","), args.procs.split(","), losses,
                             on_off("--recompute", args.recompute), on_off("--compile", args.compile),
                             baseline=bool(args.baseline))
    header = machine_header()
    header["device_type"] = bench_device_type()
    header["matmul_size"] = args.matmul_size or (8192 if header["device_type"] == "cuda" else 2048)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = _bench(args, configs, header, work, wants_dref="mpo" in losses)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        progress(f"bench_train: raw numbers in {args.json}")
    if not any("timed_steps" in result for result in results["configurations"]):
        raise InputError("every configuration failed (see the table); run with --work DIR to keep each run's bench.log")


def _bench(args, configs: list[BenchConfig], header: dict, work: Path, wants_dref: bool) -> dict:
    base = list(args.set)
    if args.make_workload:
        base = make_workload(work / "workload", dref=wants_dref, log=progress, **WORKLOADS[args.workload]) + base
    from mpo_dist.config import load_config

    try:
        config_tau = load_config(args.config, [*NO_EVAL, *base]).loss.tau
    except InputError:
        config_tau = 0.0  # the first run reports what is wrong
    layouts = sorted({(c.processes, c.threads) for c in configs})
    dtypes = sorted({c.dtype for c in configs})
    peaks = {f"{p}x{t}": {d: 0.0 for d in dtypes} for p, t in layouts}
    peak_runs = []

    def measure_peaks(when: str) -> None:
        for processes, threads in layouts:
            rates, header["device"] = matmul_peak(processes, threads, dtypes, header["matmul_size"], args.matmul_trials,
                                                  args.matmul_seconds, header["device_type"])
            peak_runs.append({"when": when, "procs": f"{processes}x{threads}", "flops": rates})
            for dtype, rate in rates.items():
                peaks[f"{processes}x{threads}"][dtype] = max(peaks[f"{processes}x{threads}"][dtype], rate)
            progress(f"bench_train: matmul peak {processes}x{threads} ({when}): "
                     + ", ".join(f"{DTYPE_SHORT[d]} {r / 1e12:.3f} TFLOP/s" for d, r in rates.items()))

    measure_peaks("before")
    card_tflops = known_peak_tflops(header["device"]) if header["device_type"] == "cuda" else None
    header["card_peak_flops"] = card_tflops * 1e12 if card_tflops else None
    runs: dict[BenchConfig, list[dict]] = {config: [] for config in configs}
    for round_index in range(args.rounds):
        for config in configs:
            if any(run["returncode"] == INPUT_ERROR_EXIT_CODE for run in runs[config]):
                continue  # an input error (an unknown option, missing data) would come again
            overrides = [*base, *config.overrides(config_tau)]
            out_dir = work / "runs" / f"r{round_index + 1}-{config.slug}"
            shutil.rmtree(out_dir, ignore_errors=True)
            command = training_command(config, args.config, overrides, out_dir, args.steps, args.log_interval)
            code = Path(args.baseline) if config.baseline else REPO
            run = {"round": round_index + 1, "command": command,
                   **run_training(command, subprocess_env(config.threads, code), out_dir, args.run_timeout)}
            if "records" in run:
                try:
                    run["summary"] = summarize(timed(windows_of(run["records"]), args.warmup_steps))
                except ValueError as error:
                    run["error"] = f"{error}: {len(run['records'])} logged steps; raise --steps"
            runs[config].append(run)
            if "summary" in run:
                summary = run["summary"]
                progress(f"bench_train: round {round_index + 1}/{args.rounds} {config.name}: "
                         f"{summary['tokens_per_s']:,.0f} tok/s, {summary['pairs_per_s']:,.1f} pairs/s ({run['wall_s']:.0f}s)")
            else:
                progress(f"bench_train: round {round_index + 1}/{args.rounds} {config.name}: failed: {run['error']}")
        measure_peaks(f"after round {round_index + 1}")

    per_config = [config_result(config, runs[config], peaks[f"{config.processes}x{config.threads}"], header["card_peak_flops"],
                                header["device_type"]) for config in configs]
    ok = [r for r in per_config if "timed_steps" in r]
    timed_steps = "-".join(map(str, ok[0]["timed_steps"])) if ok else "none"
    print(format_header(header, args, peaks, timed_steps))
    print(format_table(per_config), flush=True)
    ratios = baseline_ratios(configs, runs)
    if args.baseline:
        print(format_ratios(ratios, args.baseline), flush=True)
    return {"baseline_ratios": ratios, "header": header, "settings": {key: value for key, value in vars(args).items()}, "base_overrides": base,
            "matmul_peaks": peaks, "matmul_measurements": peak_runs,
            "configurations": [{**result, "config": asdict(config), "runs": runs[config]}
                               for config, result in zip(configs, per_config)]}


if __name__ == "__main__":
    sys.exit(main())
