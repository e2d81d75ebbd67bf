"""The GPU check: the trainer and the tools on one CUDA device, in one go, with the figures to record.

    bash tools/gpu_check.sh OUTPUT_DIR [--budget-s 480] [--work DIR] [--skip STAGE,...] [--cpu]

Stages, in order; each is reported ok, failed or skipped with its time, and the report is rewritten
after each one, so a run that is cut short still leaves what it measured:

  environment     torch, CUDA, NCCL, the GPU and its datasheet bf16 peak (read in a child process,
                  so this one never holds GPU memory)
  cuda_tests      `pytest -m cuda tests/`: the CUDA twins of tests/test_cuda.py (bf16 log-probs through
                  the chunked head, packing masks in the GPU's attention kernel, the sampler's KV
                  cache, and the trainer with NCCL at world size 1: bf16, recomputed activations,
                  packed rows, a checkpoint resumed, torch.compile, conversion)
  workload        mpo_dist/benchmark.py's `1b` workload: a random-init Llama of Llama-3.2-1B's shape
                  (1.24B parameters) in bf16 and 256 pairs of random tokens (256 prompt + 256 + 256);
                  reference log-probs and one D_ref sample per prompt made on the GPU by
                  tools/score_reference.py and tools/sample_reference.py
  attention_paths tools/bench_attention.py: the attention paths of packed rows (model.attention: dense
                  mask, varlen pieces, FlexAttention) and padded rows, through the trainer's log-prob
                  path on a random-init model of the workload's shape (built in the process, bf16;
                  32 pairs of up to 256 + 256 + 256 tokens, each with a D_ref sample): per path and
                  layout, per-token log-prob and gradient differences from the dense path (held to a
                  tolerance), tokens/s of forward + backward, peak GPU memory
  train_eager     tools/bench_train.py on it: MPO (with D_ref rows), bf16, FSDP2, padded and packed
                  rows x activation checkpointing off and on: tokens/s, MFU against the card's
                  datasheet peak and against a bf16 matmul timed in the same run, peak GPU memory
  sampler         tools/bench_sampler.py: the D_ref sampler's sampled tokens/s against transformers'
                  batched generate, same model, prompts and settings
  checkpoint      the trainer saves a checkpoint from GPU memory at step 2; a second run resumes it
                  to step 3; tools/convert_checkpoint.py converts that, transformers loads the result,
                  and its tensors equal the checkpoint's (bf16 rounding of the float32 masters)
  two_processes   `torchrun --nproc-per-node 2` on this node: with one GPU, NCCL cannot give two
                  ranks one device, so the trainer must stop at once with its one-line error naming
                  --nproc-per-node; with two or more GPUs, it must train
  train_compiled  train_eager's packed runs with torch.compile of the decoder layers (last: the
                  slowest to start, so a tight budget skips it first)

Without a GPU (or with --cpu) the same stages run on the CPU with gloo, on the `tiny` workload's model
with 64 pairs of 32 + 64 + 64 tokens, fewer steps and in float32 (a CPU without native bf16 would
emulate it, 10-50x slower): the CUDA tests are skipped (and reported so), two processes train, and
the attention paths run their plain-PyTorch twins (FlexAttention forward only: torch has no backward
for it on CPU).
That fallback checks the script itself; its figures say nothing about a GPU.

The time budget (--budget-s, default 480 s; how long each stage takes on a GPU is not measured
yet) is checked before each stage: a stage that would start after it is skipped and says so. OUTPUT_DIR receives
gpu_check.json (every figure), gpu_check.md (the tables for docs/gpu-check.md), cuda_tests.xml and the JSON of
each bench; the runs' logs and the workload (about 3 GB for the 1b one) stay under --work (default
OUTPUT_DIR/work), the runs' checkpoints are deleted once checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime
from pathlib import Path
from typing import Callable

from mpo_dist import benchmark
from mpo_dist.benchmark import REPO
from mpo_dist.cli import run_main, tool_parser
from mpo_dist.errors import INPUT_ERROR_EXIT_CODE, InputError
from mpo_dist.launcher import train_command
# In order of value: compile, the slowest to start, comes last, so a tight budget skips it first.
STAGES = ("environment", "cuda_tests", "workload", "attention_paths", "train_eager", "sampler", "checkpoint",
          "two_processes", "train_compiled")
NEEDS_WORKLOAD = {"train_eager", "train_compiled", "sampler", "checkpoint", "two_processes"}


# Sizes per device: the GPU's fill about 8 minutes on an H100; the CPU's check the script in about 3.
# pairs: the workload's pairs (prompt + response + response tokens). The CPU's are fewer and shorter than
# the tiny workload's 256 of 64 + 128 + 128: 64 pairs are what its runs read (6 steps of 8 at most), and
# scoring, sampling and training those at full length would take most of the check's time.
# eager_steps, compiled_steps: (steps of each run, the first of them left out of the timing as warm-up). The
# CPU's eager runs time steps 3-4 only; its compiled ones keep two more warm-up steps (they compile there).
SIZES = {
    "cuda": dict(workload="1b", pairs=dict(num_pairs=256, prompt=256, response=256), config="configs/llama-1b.yaml",
                 procs="1x4", eager_steps=(20, 8), compiled_steps=(20, 12), log_interval=4,
                 sampler=dict(prompts=128, batch=64, new_tokens=128), checkpoint_steps=2),
    "cpu": dict(workload="tiny", pairs=dict(num_pairs=64, prompt=32, response=64), config="configs/tiny_cpu.yaml",
                procs="1x2", eager_steps=(4, 2), compiled_steps=(6, 4), log_interval=2,
                sampler=dict(prompts=16, batch=8, new_tokens=32), checkpoint_steps=2),
}
ENVIRONMENT_SCRIPT = """
import json, platform, torch, transformers
from mpo_dist.flops import known_peak_tflops
out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
       "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    out.update(device=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
               memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
               nccl=".".join(map(str, torch.cuda.nccl.version())), bf16_supported=torch.cuda.is_bf16_supported(),
               card_peak_tflops=known_peak_tflops(torch.cuda.get_device_name(0)))
print(json.dumps(out))
"""


class StageError(Exception):
    """A stage failed: the message says what and where its log is."""


class GpuCheck:
    def __init__(self, out: Path, work: Path, budget_s: float, device_type: str, skip: set[str]):
        self.out, self.work, self.budget_s, self.device_type, self.skip = out, work, budget_s, device_type, skip
        self.size = SIZES[device_type]
        self.dtype = benchmark.WORKLOADS[self.size["workload"]]["dtype"]  # the workload's: bf16 on a GPU, float32 on CPU
        self.start = time.monotonic()
        self.workload: list[str] | None = None
        self.env = {**benchmark.subprocess_env(1), **({} if device_type == "cuda" else {"CUDA_VISIBLE_DEVICES": ""})}
        self.env.pop("OMP_NUM_THREADS")  # each tool sets its own threads
        self.report = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "device_type": device_type,
                       "dtype": self.dtype, "budget_s": budget_s, "stages": {}}

    # ------------------------------------------------------------------ running stages

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run_stage(self, name: str, body: Callable[[], dict]) -> None:
        if name in self.skip:
            result = {"status": "skipped", "why": "--skip"}
        elif name in NEEDS_WORKLOAD and self.workload is None:
            result = {"status": "skipped", "why": "no workload (the workload stage did not finish)"}
        elif self.elapsed() > self.budget_s:
            result = {"status": "skipped", "why": f"over the time budget ({self.elapsed():.0f}s of --budget-s {self.budget_s:g})"}
        else:
            progress(f"gpu_check: {name} ({self.elapsed():.0f}s so far)")
            started = time.monotonic()
            try:
                result = {"status": "ok", **body()}
            except StageError as error:
                result = {"status": "failed", "why": str(error)}
            except Exception as error:  # a bug in a stage must not lose the other stages' figures
                result = {"status": "failed", "why": f"{type(error).__name__}: {error}"}
            result["seconds"] = round(time.monotonic() - started, 1)
        self.report["stages"][name] = result
        self.report["total_seconds"] = round(self.elapsed(), 1)
        progress(f"gpu_check: {name}: {result['status']}" + (f" ({result['why']})" if "why" in result else "")
                 + (f" in {result['seconds']:.0f}s" if "seconds" in result else ""))
        self.write()

    def command(self, name: str, command: list[str], ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        """Run `command` with its output in work/logs/NAME.log; a code outside `ok_codes` fails the stage."""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        timeout = max(120.0, 1.5 * self.budget_s - self.elapsed())  # a hung run (NCCL, a deadlock) still ends
        try:
            result = subprocess.run(command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            log.write_text(f"{expired.stdout or ''}\n{expired.stderr or ''}")
            raise StageError(f"stopped after {timeout:.0f}s; see {log}") from None
        log.write_text(f"$ {' '.join(map(str, command))}\n{result.stdout}\n{result.stderr}")
        if result.returncode not in ok_codes:
            raise StageError(f"exit code {result.returncode}: {benchmark.first_error_line(result.stdout + result.stderr)} "
                             f"(log: {log})")
        return result

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=1) + "\n")
        (self.out / "gpu_check.md").write_text(format_report(self.report) + "\n")

    # ------------------------------------------------------------------ the stages

    def environment(self) -> dict:
        result = self.command("environment", [sys.executable, "-c", ENVIRONMENT_SCRIPT])
        env = json.loads(result.stdout.strip().splitlines()[-1])
        self.report["environment"] = env
        return {"summary": env.get("device", "cpu")}

    def cuda_tests(self) -> dict:
        junit = self.out / "cuda_tests.xml"
        self.command("cuda_tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                    f"--junitxml={junit}", "tests/"], ok_codes=(0, 1, 5))
        counts = junit_counts(junit)
        if counts["tests"] == 0:
            raise StageError("pytest collected no test marked cuda")
        if counts["failed"]:
            raise StageError(f"{counts['failed']} of {counts['tests']} CUDA tests failed: {', '.join(counts['failures'])}")
        if self.device_type == "cuda" and counts["passed"] == 0:
            raise StageError(f"no CUDA test ran on the GPU ({counts['skipped']} skipped)")
        if self.device_type == "cpu":
            return {**counts, "summary": f"all {counts['skipped']} CUDA tests skipped: no GPU"}
        return {**counts, "summary": f"{counts['passed']} passed, {counts['skipped']} skipped"}

    def make_workload(self) -> dict:
        started = time.monotonic()
        workload = benchmark.WORKLOADS[self.size["workload"]]
        pairs = self.size["pairs"]
        self.workload = benchmark.make_workload(self.work / "workload", dref=True, log=progress, **{**workload, **pairs})
        return {"workload": self.size["workload"], **pairs,
                "summary": f"{self.size['workload']} workload, {pairs['num_pairs']} pairs of {pairs['prompt']} + "
                           f"{pairs['response']} + {pairs['response']} tokens, in {time.monotonic() - started:.0f}s"}

    def attention_paths(self) -> dict:
        json_path = self.out / "bench_attention.json"
        self.command("attention_paths", [sys.executable, str(REPO / "tools" / "bench_attention.py"), "--device",
                                         self.device_type, "--json", str(json_path)])
        result = json.loads(json_path.read_text())
        self.report["attention_paths"] = result  # the table, also when the check below fails the stage
        rows = {f"{row['path']} {row['layout']}": row for row in result["rows"]}
        failed = [name for name, row in rows.items() if row["status"] == "failed"]
        if failed:
            raise StageError(f"{', '.join(failed)} failed: {rows[failed[0]]['why']} (see {json_path})")
        unequal = [name for name, row in rows.items() if row.get("within_tolerance") is False]
        if unequal:
            raise StageError(f"{', '.join(unequal)} differ from the dense path beyond the tolerance "
                             f"{result['header']['tolerance']} (see {json_path})")
        return {"summary": attention_summary(result)}

    def bench(self, name: str, layouts: str, compile_: str, steps: tuple[int, int]) -> dict:
        json_path = self.out / f"bench_{name}.json"
        sets = [item for override in self.workload for item in ("--set", override)]
        self.command(name, [sys.executable, str(REPO / "tools" / "bench_train.py"), "--config", self.size["config"], *sets,
                            "--layouts", layouts, "--dtypes", self.dtype, "--procs", self.size["procs"], "--losses", "mpo",
                            "--recompute", "off,on", "--compile", compile_, "--rounds", "1",
                            "--steps", str(steps[0]), "--warmup-steps", str(steps[1]),
                            "--log-interval", str(self.size["log_interval"]), "--matmul-trials", "3",
                            "--matmul-seconds", "0.3", "--work", str(self.work / name), "--json", str(json_path)])
        results = json.loads(json_path.read_text())
        rows = [training_row(config) for config in results["configurations"]]
        failed = [row["name"] for row in rows if "error" in row]
        if failed:
            raise StageError(f"{len(failed)} configurations failed: {', '.join(failed)} (see {json_path})")
        self.report.setdefault("matmul", {})[name] = {"device": results["header"].get("device"),
                                                      "peak_flops": results["matmul_peaks"],
                                                      "card_peak_flops": results["header"].get("card_peak_flops")}
        best = max(rows, key=lambda row: row["tokens_per_s"])
        return {"rows": rows, "summary": f"best {best['name']}: {best['tokens_per_s']:,.0f} tokens/s"}

    def sampler(self) -> dict:
        json_path = self.out / "bench_sampler.json"
        settings = self.size["sampler"]
        model = self.work / "workload" / "model"
        eos = json.loads((model / "config.json").read_text())["eos_token_id"]
        self.command("sampler", [sys.executable, str(REPO / "tools" / "bench_sampler.py"), "--model", str(model),
                                 "--pairs", str(self.work / "workload" / "pairs"), "--num-prompts", str(settings["prompts"]),
                                 "--batch-size", str(settings["batch"]), "--max-new-tokens", str(settings["new_tokens"]),
                                 "--rounds", "2", "--eos-ids", str(eos), "--dtype", self.dtype, "--json", str(json_path)])
        medians = json.loads(json_path.read_text())["medians"]
        ours = medians["mpo_dist continuous"]
        return {"medians": medians, "settings": settings,
                "summary": f"{ours['tokens_per_second']:,.0f} tokens/s, {ours['ratio_to_generate']:.2f}x transformers generate"}

    def train_command(self, out_dir: Path, steps: int, nproc: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
        return train_command(self.size["config"], [
            *benchmark.NO_EVAL, *self.workload, "loss.name=mpo", f"loss.tau={benchmark.MPO_TAU}", "data.packing=always",
            f"job.output_dir={out_dir}", f"training.steps={steps}", "metrics.log_interval=1", "metrics.tensorboard=false",
            "checkpoint.export_hf=false", "checkpoint.keep_best=", *extra], nproc)

    def checkpoint(self) -> dict:
        run_dir = self.work / "checkpoint" / "run"
        shutil.rmtree(run_dir.parent, ignore_errors=True)
        saved_at = self.size["checkpoint_steps"]
        self.command("checkpoint_save", self.train_command(run_dir, saved_at, extra=("checkpoint.resume=none",)))
        resumed = self.command("checkpoint_resume", self.train_command(run_dir, saved_at + 1, extra=("checkpoint.resume=auto",)))
        if f"resumed from {run_dir / 'checkpoints' / f'step-{saved_at:08d}'}" not in resumed.stdout + resumed.stderr:
            raise StageError(f"the second run did not say it resumed from step {saved_at} (log: {self.work / 'logs'})")
        final = run_dir / "checkpoints" / f"step-{saved_at + 1:08d}"
        converted = self.work / "checkpoint" / "hf"
        self.command("checkpoint_convert", [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"),
                                            "--checkpoint", str(final), "--out", str(converted), "--dtype", "bfloat16"])
        compared = compare_converted(final, converted, self.work / "workload" / "model")
        # A 1B model's checkpoints hold float32 weights and two Adam moments (about 15 GB each).
        shutil.rmtree(run_dir / "checkpoints")
        shutil.rmtree(converted)
        return {**compared, "summary": f"saved at step {saved_at}, resumed to {saved_at + 1}, converted: "
                                       f"{compared['tensors_equal']} tensors equal the checkpoint's"}

    def two_processes(self) -> dict:
        devices = self.report.get("environment", {}).get("device_count", 0) if self.device_type == "cuda" else 0
        expect_error = self.device_type == "cuda" and devices < 2
        result = self.command("two_processes", self.train_command(self.work / "two_processes", 2, nproc=2,
                                                                  extra=("checkpoint.resume=none",)),
                              ok_codes=(INPUT_ERROR_EXIT_CODE,) if expect_error else (0,))
        shutil.rmtree(self.work / "two_processes" / "checkpoints", ignore_errors=True)
        if expect_error:
            if "has no GPU" not in result.stderr or "--nproc-per-node" not in result.stderr:
                raise StageError("two processes on one GPU stopped with code 2 but without the error naming --nproc-per-node")
            return {"summary": "one GPU: stopped at once with the error naming --nproc-per-node (NCCL cannot share a GPU)"}
        return {"summary": "two processes trained 2 steps"}

    def run(self) -> dict:
        self.run_stage("environment", self.environment)
        self.run_stage("cuda_tests", self.cuda_tests)
        self.run_stage("workload", self.make_workload)
        self.run_stage("attention_paths", self.attention_paths)
        self.run_stage("train_eager", lambda: self.bench("train_eager", "padded,packed", "off", self.size["eager_steps"]))
        self.run_stage("sampler", self.sampler)
        self.run_stage("checkpoint", self.checkpoint)
        self.run_stage("two_processes", self.two_processes)
        self.run_stage("train_compiled", lambda: self.bench("train_compiled", "packed", "on", self.size["compiled_steps"]))
        return self.report


# ---------------------------------------------------------------------------------- reading results


def junit_counts(path: Path) -> dict:
    """Passed, failed (failures and errors), skipped and the failing tests' names from a pytest junit XML."""
    root = ElementTree.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failures = [f"{case.get('classname')}::{case.get('name')}" for case in cases
                if case.find("failure") is not None or case.find("error") is not None]
    skipped = sum(case.find("skipped") is not None for case in cases)
    return {"tests": len(cases), "passed": len(cases) - len(failures) - skipped, "failed": len(failures),
            "skipped": skipped, "failures": failures}


def training_row(config: dict) -> dict:
    """One configuration of a bench_train JSON: what the report's training table shows."""
    if "error" in config:
        return {"name": config["name"], "error": config["error"]}
    return {"name": config["name"], "tokens_per_s": config["tokens_per_s_median"], "pairs_per_s": config["pairs_per_s_median"],
            "mfu_matmul": config["mfu_median"], "mfu_card": config.get("mfu_card_median"),
            "device_peak_bytes": config.get("device_peak_bytes"), "device_reserved_bytes": config.get("device_reserved_bytes"),
            "rank_peak_bytes": config["max_rank_peak_bytes"],
            "padding": config["padding"], "timed_steps": config["timed_steps"]}


def attention_summary(result: dict) -> str:
    """One line of a tools/bench_attention.py result: each configuration's tokens/s against dense padded
    rows (what training gets without packing), the largest log-prob difference, and what was skipped."""
    rows = [row for row in result["rows"] if row["status"] == "ok"]
    baseline = dense_padded_tokens_per_s(result)
    speeds = [f"{row['path']} {row['layout']} {row['tokens_per_s'] / baseline:.2f}x"
              + (" (forward only)" if row["mode"] == "forward" else "")
              for row in rows if baseline and (row["path"], row["layout"]) != ("dense", "padded")]
    largest = max((row["logps_max_abs_diff"] for row in rows if "logps_max_abs_diff" in row), default=None)
    skipped = [f"{row['path']} {row['layout']}" for row in result["rows"] if row["status"] == "skipped"]
    parts = [f"tokens/s against dense padded: {', '.join(speeds)}" if speeds else "nothing to compare with dense padded"]
    if largest is not None:
        parts.append(f"largest log-prob difference {largest:.1e} (tolerance {result['header']['tolerance']['logps']:g})")
    return "; ".join(parts + ([f"skipped (see the table): {', '.join(skipped)}"] if skipped else []))


def dense_padded_tokens_per_s(result: dict) -> float | None:
    return next((row["tokens_per_s"] for row in result["rows"]
                 if (row["path"], row["layout"], row["status"]) == ("dense", "padded", "ok")), None)


def compare_converted(checkpoint: Path, converted: Path, start_model: Path) -> dict:
    """The converted model loads in transformers; a few of its tensors equal the checkpoint's (read
    straight from the DCP files, rounded to the converted dtype) and differ from the start's."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import load as dcp_load
    from transformers import AutoModelForCausalLM

    from mpo_dist.checkpoint import MODEL_PREFIX
    from mpo_dist.dcp_reader import SafeFileSystemReader

    with contextlib.redirect_stderr(io.StringIO()):  # transformers' loading progress bar
        model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.bfloat16)
    loaded = model.state_dict()
    names = ["model.norm.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    metadata = SafeFileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    stored = {MODEL_PREFIX + name: torch.empty(metadata[MODEL_PREFIX + name].size, dtype=metadata[MODEL_PREFIX + name].properties.dtype)
              for name in names}
    dcp_load(stored, storage_reader=SafeFileSystemReader(str(checkpoint)), no_dist=True)
    start = {}
    for file in sorted(start_model.glob("*.safetensors")):
        start.update({key: value for key, value in load_file(str(file)).items() if key in names})
    equal = [name for name in names if torch.equal(loaded[name], stored[MODEL_PREFIX + name].to(torch.bfloat16))]
    changed = [name for name in names if not torch.equal(loaded[name], start[name].to(torch.bfloat16))]
    if len(equal) < len(names):
        raise StageError(f"converted tensors differ from the checkpoint's: {sorted(set(names) - set(equal))}")
    if not changed:
        raise StageError(f"training changed none of {names}: the checkpoint holds the starting weights")
    return {"tensors_loaded": len(loaded), "tensors_equal": len(equal), "tensors_changed_by_training": len(changed)}


# ---------------------------------------------------------------------------------- the report


def _si(value: float | None, unit: str = "", scale: float = 1.0, spec: str = ",.0f") -> str:
    return "n/a" if value is None else f"{format(value * scale, spec)}{unit}"


def format_report(report: dict) -> str:
    env = report.get("environment", {})
    device = env.get("device", "CPU (no GPU: the fallback checks the script, not a GPU)")
    lines = [f"# GPU check, {report['date']}", "",
             f"{device}" + (f", compute capability {env['capability']}, {env['memory_gib']:.0f} GiB, CUDA {env['cuda']}, "
                            f"NCCL {env['nccl']}" if "cuda" in env else "")
             + f"; torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, Python {env.get('python', '?')}. "
             f"Total {report.get('total_seconds', 0):.0f} s of a {report['budget_s']:g} s budget.", "",
             "| stage | status | seconds | result |", "|---|---|---|---|"]
    for name, stage in report["stages"].items():
        text = stage.get("summary") or stage.get("why", "")
        lines.append(f"| {name} | {stage['status']} | {stage.get('seconds', '')} | {text} |")
    if "attention_paths" in report:
        lines += ["", *format_attention(report["attention_paths"])]
    rows = [(name, row) for name in ("train_eager", "train_compiled")
            for row in report["stages"].get(name, {}).get("rows", [])]
    if rows:
        matmul = next(iter(report.get("matmul", {}).values()), {})
        dtype = report.get("dtype", "bfloat16")
        short = benchmark.DTYPE_SHORT.get(dtype, dtype)
        peaks = "; ".join(f"{procs}: {rate[dtype] / 1e12:,.1f} TFLOP/s" for procs, rate in matmul.get("peak_flops", {}).items())
        card = matmul.get("card_peak_flops")
        lines += ["", f"Training, MPO with D_ref rows, {short}, FSDP2. Timed {short} matmul: {peaks}"
                  + (f"; card datasheet peak {card / 1e12:,.0f} TFLOP/s." if card else "; no datasheet peak (CPU)."), "",
                  "| configuration | tokens/s | pairs/s | MFU (card) | MFU (timed matmul) | peak GPU memory: allocated, "
                  "reserved | rank peak RSS |", "|---|---|---|---|---|---|---|"]
        for _, row in rows:
            lines.append(f"| {row['name']} | {_si(row['tokens_per_s'])} | {_si(row['pairs_per_s'], spec=',.2f')} | "
                         f"{_si(row['mfu_card'], '%', 100, '.1f')} | {_si(row['mfu_matmul'], '%', 100, '.1f')} | "
                         f"{_si(row['device_peak_bytes'], ' GiB', 2**-30, '.1f')}, {_si(row['device_reserved_bytes'], ' GiB', 2**-30, '.1f')} | "
                         f"{_si(row['rank_peak_bytes'], ' GiB', 2**-30, '.2f')} |")
    sampler = report["stages"].get("sampler", {})
    if "medians" in sampler:
        settings = sampler["settings"]
        lines += ["", f"Sampler: {settings['prompts']} prompts, batch {settings['batch']}, up to {settings['new_tokens']} new "
                      "tokens, temperature 1 (median of 2 rounds).", "",
                  "| sampler | tokens/s | vs transformers generate |", "|---|---|---|"]
        for name, median in sampler["medians"].items():
            lines.append(f"| {name} | {_si(median['tokens_per_second'])} | {median['ratio_to_generate']:.2f}x |")
    return "\n".join(lines)


def format_attention(result: dict) -> list[str]:
    """The attention paths' table (tools/bench_attention.py's result)."""
    header = result["header"]
    short = benchmark.DTYPE_SHORT.get(header["dtype"], header["dtype"])
    memory = "peak GPU memory allocated, rise in the pass" if header["device_type"] == "cuda" else "peak RSS, rise in the pass"
    lines = [f"Attention paths (tools/bench_attention.py): the {header['workload']} workload's model, {short}, "
             f"{header['pairs']} pairs of up to {header['prompt']} + {header['response']} + {header['response']} tokens, "
             f"each with a D_ref sample, {header['pairs_per_batch']} pairs per micro-batch, packed rows of up to "
             f"{header['pack_tokens']} positions; median of {header['repeats']} passes after {header['warmup']} warmup passes. "
             f"Differences from the dense path of the same layout (dense packed: from padded rows); tolerance "
             f"{header['tolerance']['logps']:g} a token, {header['tolerance']['grad']:g} on the gradient.", "",
             f"| path | layout | status | pass | tokens/s | vs dense padded | model TFLOP/s | MFU (card) | {memory} | "
             "max abs log-prob diff | gradient rel. diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    baseline = dense_padded_tokens_per_s(result)
    for row in result["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['path']} | {row['layout']} | {row['status']} | {row.get('why', '')} |" + " |" * 7)
            continue
        if "reference" not in row:
            differences = "(the reference) | (the reference)"
        else:
            grad = "(forward only)" if row["grad_relative_diff"] is None else f"{row['grad_relative_diff']:.1e}"
            differences = f"{row['logps_max_abs_diff']:.1e} | {grad}"
        ratio = row["tokens_per_s"] / baseline if baseline else None
        lines.append(f"| {row['path']} | {row['layout']} | ok | {row['mode']} | {_si(row['tokens_per_s'])} | "
                     f"{_si(ratio, 'x', spec='.2f')} | {_si(row['model_tflops_per_s'], spec=',.3g')} | "
                     f"{_si(row['mfu_card'], '%', 100, '.1f')} | {_si(row['peak_bytes'], ' MiB', 2**-20)}, "
                     f"{_si(row['peak_above_start_bytes'], ' MiB', 2**-20)} | {differences} |")
    return lines


# ---------------------------------------------------------------------------------- main


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("out", help="folder for the report (created)")
    parser.add_argument("--work", default=None, help="folder for the workload and the runs' logs; default OUTPUT_DIR/work")
    parser.add_argument("--budget-s", type=float, default=480.0, help="no stage starts after this many seconds")
    parser.add_argument("--skip", default="", help=f"stages to leave out, comma-separated: {', '.join(STAGES)}")
    parser.add_argument("--cpu", action="store_true", help="the CPU fallback even when a GPU is visible")
    args = parser.parse_args(argv)

    def body(info) -> None:
        skip = {name for name in args.skip.split(",") if name}
        unknown = skip - set(STAGES)
        if unknown:
            raise InputError(f"--skip: {', '.join(sorted(unknown))} is not a stage; the stages are {', '.join(STAGES)}")
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        work = Path(args.work).resolve() if args.work else out / "work"
        device_type = "cpu" if args.cpu else benchmark.bench_device_type()
        report = GpuCheck(out, work, args.budget_s, device_type, skip).run()
        print(format_report(report))
        failed = [name for name, stage in report["stages"].items() if stage["status"] == "failed"]
        if failed:
            raise InputError(f"{len(failed)} stage{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)} "
                             f"(see {out / 'gpu_check.md'})")

    return run_main("gpu_check", body)


if __name__ == "__main__":
    sys.exit(main())
