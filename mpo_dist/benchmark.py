"""What the benchmark tools share (tools/bench_train.py, tools/gpu_check.py): the synthetic workload
they train on, the environment of the training runs they start, and the line that says why one failed.

The workload (`make_workload`): a random-init Llama saved as a Hugging Face folder (the policy's
start and the reference), pairs of random token ids, reference log-probs from
tools/score_reference.py and, when asked, one D_ref sample per prompt from tools/sample_reference.py,
all in the workload's dtype. `WORKLOADS` holds its sizes: `tiny` (vocab 4096, hidden 256, 4 layers,
4 heads, MLP 688; 256 pairs of 64 prompt + 128 chosen + 128 rejected tokens, float32) and `1b`
(Llama-3.2-1B's shape: 1.24B parameters, vocab 128256, 16 layers, hidden 2048, 32 heads, 8 KV heads,
tied embeddings; 256 + 256 + 256 tokens, bf16, for a GPU).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
# The trainer's held-out eval is off in every benchmark run (the config's eval folders may not exist).
NO_EVAL = ["eval.pairs=", "eval.reference=", "eval.dref=", "eval.interval=0"]
MPO_TAU = 0.05  # loss.tau of an `mpo` run when the config has none
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16"}
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


# glibc's malloc raises its mmap threshold to the size of each large block freed (up to 32 MiB); then
# blocks of that size come from its heap and, freed, stay in the process: a CPU rank's resident memory
# grows by memory no tensor holds (a sharded forward gathers and frees every layer's parameters). The
# memory benchmarks run with "fixed" (the threshold pinned: freed blocks go back to the system, the peak
# is what the tensors need) or "default" (glibc's own; the sharded CPU tools pin theirs themselves).
ALLOCATORS = {"fixed": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}


def bench_device_type() -> str:
    """Where the trainer runs: "cuda" when a GPU is visible (it then uses one per process), else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def subprocess_env(threads: int, code: Path = REPO) -> dict[str, str]:
    """The environment of a run a benchmark starts: the checkout `code` (default this one) importable,
    warnings off, `threads` OpenMP threads per process, and none of the torchrun variables of an
    enclosing launch. Another checkout's package is imported even from this one's folder (relative
    paths in configs keep their meaning): PYTHONSAFEPATH stops `python -m` putting the folder first."""
    env = {key: value for key, value in os.environ.items() if key not in _TORCHRUN_VARIABLES}
    env.update(PYTHONPATH=os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
    if Path(code).resolve() != REPO.resolve():
        env["PYTHONSAFEPATH"] = "1"
    return env


def first_error_line(text: str) -> str:
    """What stopped a run: the trainer's one-line input error, else the first exception line of a
    rank's traceback (not torchrun's ChildFailedError summary), else what killed a rank (a C++
    abort, torchrun's root-cause exit code), else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in (r"^mpo_dist: error", r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception)\b", r"^terminate called"):
        for line in lines:
            if re.search(pattern, line) and "ChildFailedError" not in line:
                return line
    root = next((i for i, line in enumerate(lines) if line.startswith("Root Cause")), None)
    if root is not None:
        exit_line = next((line for line in lines[root:] if line.startswith("exitcode")), None)
        if exit_line is not None:
            return f"a rank failed, {' '.join(exit_line.split())}"
    return lines[-1] if lines else "no output"


TINY_MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)


def write_workload_pairs(directory: Path, num_pairs: int, prompt: int, response: int, vocab: int, seed: int,
                         per_shard: int = 64) -> None:
    """Pairs shards of random token ids (3..vocab-1: no special token), every pair prompt + response x 2."""
    import numpy as np

    from mpo_dist.data.shards import Manifest, ShardInfo, ShardWriter, shard_name

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, first in enumerate(range(0, num_pairs, per_shard)):
        keys = range(first, min(first + per_shard, num_pairs))
        with ShardWriter(directory / shard_name(index), "pairs") as writer:
            for key in keys:
                ids = {name: rng.integers(3, vocab, size=length).astype(np.int32)
                       for name, length in (("prompt_ids", prompt), ("chosen_ids", response), ("rejected_ids", response))}
                writer.write(f"{key:09d}", {"prompt": f"synthetic {key}", "chosen": "", "rejected": "", "label": None}, ids)
        shards.append(ShardInfo(shard_name(index), len(keys), [prompt + response] * len(keys)))
    info = {"created_by": "tools/bench_train.py --make-workload", "seed": seed,
            "tokenizer": {"vocab_size": vocab, "pad_token_id": 0}}
    Manifest("pairs", "synthetic:random-token-ids", shards, info=info).write(directory)


def write_runtime_script(folder: Path, modules: Sequence[str]) -> Path:
    """folder/runtime.py: what a rank holds before any model (its runtime baseline), as a script that
    imports `modules` (what the measured stage imports), joins a gloo group and meets at a barrier."""
    script = Path(folder) / "runtime.py"
    script.write_text("import torch.distributed as dist\n" + "".join(f"import {module}\n" for module in modules)
                      + 'dist.init_process_group("gloo"); dist.barrier()\n')
    return script


def run_in_child(target, *args, what: str) -> None:
    """`target(*args)` in a spawned process (it frees all its memory, and a GPU's context, on exit);
    raises when it fails, naming `what`."""
    child = multiprocessing.get_context("spawn").Process(target=target, args=args)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{what} failed (its traceback is above)")


def measure_ranks(command: list, ranks: int, env: dict[str, str], timeout: float):
    """Run `command` (a launch of `ranks` processes) and read every process's peak memory while it runs
    (process_memory.ProcessTreeMonitor). Returns (each rank's ProcessPeak, None for a rank never seen;
    seconds; exit code; its output, stdout and stderr together)."""
    from mpo_dist.process_memory import ProcessTreeMonitor

    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with ProcessTreeMonitor(process.pid, interval_s=0.05) as monitor:
        output, _ = process.communicate(timeout=timeout)
    by_role = {p.role: p for p in monitor.peaks()}
    return [by_role.get(f"rank {rank}") for rank in range(ranks)], time.monotonic() - start, process.returncode, output


def run_tool(script: str, *args, threads: int) -> None:
    command = [sys.executable, str(REPO / "tools" / script), *map(str, args), "--threads", str(threads)]
    result = subprocess.run(command, env=subprocess_env(threads), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed ({result.returncode}): {result.stderr[-3000:]}")


# Llama-3.2-1B's shape (1.24B parameters, tied embeddings), random init: the GPU check's model.
LLAMA_1B_MODEL = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
# --workload: the model, pair sizes, dtype and batch sizes (pairs per micro-batch, per optimizer step per process).
WORKLOADS = {
    "tiny": dict(model=TINY_MODEL, prompt=64, response=128, dtype="float32", batch_size=4, global_batch_size=8,
                 score_batch_size=16, sample_batch_size=64),
    "1b": dict(model=LLAMA_1B_MODEL, prompt=256, response=256, dtype="bfloat16", batch_size=8, global_batch_size=16,
               score_batch_size=32, sample_batch_size=128),
}


def _save_random_model(model: dict, dtype: str, seed: int, model_dir: str) -> None:
    """A random-init Llama of config `model` saved in `dtype`; initialised on the GPU when there is
    one (a 1B model's random init takes a while on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"), contextlib.redirect_stderr(io.StringIO()):
        lm = AutoModelForCausalLM.from_config(LlamaConfig(**model)).to(getattr(torch, dtype))
        lm.save_pretrained(model_dir)  # (the redirect: transformers' progress bar of one shard)


def make_workload(folder: Path, *, dref: bool, model: dict = TINY_MODEL, num_pairs: int = 256, prompt: int = 64,
                  response: int = 128, dtype: str = "float32", batch_size: int = 4, global_batch_size: int = 8,
                  score_batch_size: int = 16, sample_batch_size: int = 64, seed: int = 0, log=print) -> list[str]:
    """The synthetic workload under `folder` (reused when complete); returns its trainer overrides.

    The model is saved in `dtype` and scored and sampled in it by the project's tools (on the GPU
    when there is one)."""
    model_dir, pairs, reference, dref_dir = (folder / name for name in ("model", "pairs", "reference", "dref"))
    threads = os.cpu_count() or 1
    if not (pairs / "manifest.json").is_file():
        start = time.monotonic()
        # In a child process: on a GPU this one would keep the CUDA context and the allocator's cache.
        run_in_child(_save_random_model, model, dtype, seed, str(model_dir),
                     what=f"making the workload's model in {model_dir}")
        write_workload_pairs(pairs, num_pairs, prompt, response, model["vocab_size"], seed)
        log(f"bench_train: workload model and {num_pairs} pairs in {folder} ({time.monotonic() - start:.0f}s)")
    if not (reference / "manifest.json").is_file():
        start = time.monotonic()
        run_tool("score_reference.py", "--model", model_dir, "--pairs", pairs, "--out", reference, "--batch-size",
                 score_batch_size, "--dtype", dtype, threads=threads)
        log(f"bench_train: reference log-probs scored ({time.monotonic() - start:.0f}s)")
    if dref and not (dref_dir / "manifest.json").is_file():
        start = time.monotonic()
        run_tool("sample_reference.py", "--model", model_dir, "--pairs", pairs, "--out", dref_dir, "--num-samples", 1,
                 "--max-new-tokens", response, "--batch-size", sample_batch_size, "--dtype", dtype, threads=threads)
        log(f"bench_train: D_ref sampled, 1 x {response} tokens per prompt ({time.monotonic() - start:.0f}s)")
    return [f"model.path={model_dir}", "model.config={}", f"model.dtype={dtype}", f"data.pairs={pairs}",
            f"data.reference={reference}", f"data.dref={dref_dir if dref else ''}", f"data.batch_size={batch_size}",
            f"data.dref_batch_size={batch_size}", f"training.global_batch_size={global_batch_size}", "data.batching=fixed",
            "data.pad_to_multiple_of=1", "loss.name=dpo", "loss.tau=0", "loss.label_smoothing=0"]
