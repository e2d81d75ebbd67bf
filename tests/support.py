"""Shared test helpers and fixtures: the repository root, the real third-party assets beside the
repository (SHARED_DATA), the toy and stories260K training inputs, and subprocess helpers (tools,
torchrun, the trainer) with one quiet environment.

Test files import these names with `from support import ...` and never redefine them; the fixtures
are registered by conftest.py (`pytest_plugins`), so a test names them as arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpo_dist.launcher import launch_command, train_command

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TRAIN_CONFIG = REPO / "configs" / "tiny_cpu.yaml"

# For every subprocess a test starts: this checkout importable, warnings off, one thread per process,
# and none of the torchrun variables of an enclosing launch (a child would join the wrong group).
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
SUBPROCESS_ENV = {
    **{key: value for key, value in os.environ.items() if key not in _TORCHRUN_VARIABLES},
    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    "PYTHONWARNINGS": "ignore",
    "OMP_NUM_THREADS": "1",
}


def require_shared(*parts: str) -> Path:
    """The path SHARED_DATA/parts; fails (never skips) the test with a clear message when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(
            f"{path} is missing: this test needs the real assets in ../shared/data beside the repository "
            f"({SHARED_DATA}); see ../shared/data/README.md",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def shared_data():
    """`shared_data("gpt2-tokenizer")` -> the asset's path, failing the test when it is absent."""
    return require_shared


@pytest.fixture()
def one_torch_thread():
    """For tiny models: one CPU thread is fastest, and threads spinning on a busy machine are far slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QUIET = lambda message: None  # noqa: E731  (a log callback that prints nothing)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous or a process group)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def one_process_group():
    """A gloo process group of this test process alone, for code that needs one (FSDP2, DCP)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def toy_inputs(tmp_path_factory) -> dict[str, Path]:
    """The quickstart's inputs, small: the digit-sorting task, its tiny random-init Llama (the policy's
    start and the reference), pairs shards, reference log-probs and D_ref samples."""
    return build_toy_inputs(tmp_path_factory.mktemp("toy"))


def build_toy_inputs(root: Path) -> dict[str, Path]:
    """toy_inputs' folders under `root` (also built by tests/cluster_support.py for the cluster scripts)."""
    from transformers import AutoModelForCausalLM

    from mpo_dist.producers.prepare import PrepareOptions, prepare_pairs
    from mpo_dist.data.toy_task import write_toy_task
    from mpo_dist.producers.score import score_pairs
    from mpo_dist.producers.sample import SamplingParams, sample_dref

    pairs_jsonl, model_dir = write_toy_task(root / "toy", num_records=1200, seed=0)
    prepare_pairs(pairs_jsonl, model_dir, root / "pairs",
                  PrepareOptions(samples_per_shard=300, max_length=64, max_prompt_length=32), log=QUIET)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir))
    score_pairs(reference, root / "pairs", root / "reference", batch_size=64, log=QUIET)
    sample_dref(reference, root / "pairs", root / "dref", SamplingParams(num_samples=1, max_new_tokens=10),
                eos_token_ids=reference.config.eos_token_id, pad_token_id=0, batch_size=100, log=QUIET)
    return {"root": root, "model": model_dir, "pairs": root / "pairs", "reference": root / "reference", "dref": root / "dref"}


@pytest.fixture(scope="session")
def stories_inputs(tmp_path_factory) -> dict[str, Path]:
    """stories260K (real pretrained weights) with 40 HH-RLHF pairs prepared by its tokenizer and scored by it."""
    from transformers import AutoModelForCausalLM

    from mpo_dist.producers.prepare import PrepareOptions, prepare_pairs
    from mpo_dist.producers.score import score_pairs

    root = tmp_path_factory.mktemp("stories")
    model = require_shared("stories260K")
    records = require_shared("hh-rlhf-harmless-test", "pairs.jsonl").read_text().splitlines()[:40]
    (root / "hh.jsonl").write_text("\n".join(records) + "\n")
    prepare_pairs(root / "hh.jsonl", model, root / "pairs",
                  PrepareOptions(samples_per_shard=8, max_length=160, max_prompt_length=96), log=QUIET)
    score_pairs(AutoModelForCausalLM.from_pretrained(str(model)), root / "pairs", root / "reference", batch_size=4, log=QUIET)
    return {"root": root, "model": model, "pairs": root / "pairs", "reference": root / "reference"}


def torchrun_command(nproc: int, target: list[str]) -> list[str]:
    """torchrun as the launch scripts run it (mpo_dist.launcher: torchrun passing input errors through
    as exit 2) on NPROC processes: TARGET is a script and its arguments, or `-m module ...`."""
    return launch_command(nproc, target)


def run_tool(script_name: str, *args, cwd: str | os.PathLike | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python tools/SCRIPT_NAME ARGS...` in SUBPROCESS_ENV, output captured as text; the caller checks it."""
    return subprocess.run([sys.executable, str(REPO / "tools" / script_name), *map(str, args)], env=SUBPROCESS_ENV,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


NO_EVAL = ["eval.pairs=", "eval.reference=", "eval.dref=", "eval.interval=0"]
# Training tests compute in float32, not the config's model.dtype=auto: a CPU without native bfloat16
# would emulate it (10-50x slower) and one with it would round differently, so a test's time and numbers
# would depend on the machine. Tests about bfloat16 itself set model.dtype=bfloat16 after this.
FLOAT32 = "model.dtype=float32"


def train(*overrides, nproc: int = 2, check: bool = True, timeout: int = 300):
    """`torchrun -m mpo_dist.train --config configs/tiny_cpu.yaml OVERRIDES` with its output captured.
    The config's held-out eval (the quickstart's folders) is off and model.dtype is float32 unless OVERRIDES set them."""
    overrides = [*NO_EVAL, FLOAT32, *map(str, overrides)]
    result = subprocess.run(train_command(TRAIN_CONFIG, overrides, nproc), env=SUBPROCESS_ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def toy_overrides(toy: dict, out: Path, **extra) -> list[str]:
    # No held-out eval unless a test asks for it (the config's eval folders are the quickstart's); float32 (FLOAT32).
    values = {"job.output_dir": out, "model.path": toy["model"], "model.dtype": "float32", "data.pairs": toy["pairs"],
              "data.reference": toy["reference"], "data.dref": toy["dref"], "metrics.log_interval": 1,
              "eval.pairs": "", "eval.reference": "", "eval.dref": "", "eval.interval": 0, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def flat_checkpoint(folder: Path, tmp_path: Path) -> dict:
    """A DCP checkpoint folder as one flat {dotted.name: value} dict (via a torch.save copy in tmp_path)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{folder.parent.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(target))

    def flatten(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    return flatten(torch.load(target, weights_only=False))


class Counter:
    """The smallest Stateful (torch.distributed.checkpoint's protocol): one int that must survive a checkpoint."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def worker_pids(parent: int) -> list[int]:
    """The live processes whose parent is `parent` (the workers torchrun started), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return sorted(children)


# Tiny causal LMs and packed micro-batches for the attention paths (model.attention).
TINY_VOCAB = 97


def tiny_causal_lm(kind: str):
    """A 2-layer float32 "llama", "qwen2" (GQA: 4 query heads over 2 key/value heads) or "gpt2" with
    seed 0, SDPA attention, no dropout and the log-prob method, as model.build_model prepares it."""
    import torch
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    from mpo_dist.model import build_model_from_config

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    elif kind == "qwen2":
        config = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    else:
        config = GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return build_model_from_config(config, torch.float32, "cpu")  # no dropout: the paths' numbers compare in training


def collated_samples(seed: int = 0, pairs: int = 5, dref: int = 3):
    """Collated pairs and D_ref samples (data/collate.py's keys) of various lengths, one empty prompt."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    ids = lambda low, high: rng.integers(1, TINY_VOCAB, size=int(rng.integers(low, high)))  # noqa: E731
    prompts = [ids(1, 12) for _ in range(pairs)]
    prompts[1] = np.zeros(0, np.int64)
    chosen, rejected = [ids(1, 14) for _ in range(pairs)], [ids(1, 14) for _ in range(pairs)]
    pair_batch = dict(prompt_ids=prompts, chosen_ids=chosen, rejected_ids=rejected,
                      label=torch.ones(pairs), is_pad=torch.zeros(pairs, dtype=torch.bool), keys=[str(i) for i in range(pairs)],
                      chosen_lengths=torch.tensor([len(c) for c in chosen], dtype=torch.float32),
                      rejected_lengths=torch.tensor([len(r) for r in rejected], dtype=torch.float32))
    responses = [ids(1, 14) for _ in range(dref)]
    dref_batch = dict(prompt_ids=[ids(1, 10) for _ in range(dref)], response_ids=responses, ref_logps=torch.zeros(dref),
                      response_lengths=torch.tensor([len(r) for r in responses], dtype=torch.float32),
                      is_pad=torch.zeros(dref, dtype=torch.bool), keys=[f"d{i}" for i in range(dref)])
    return pair_batch, dref_batch


def packed_micro_batch(varlen: bool, packing: str = "always", bucket_shapes: bool = False):
    """A batch.MicroBatch of `collated_samples()`: packed (rows of at most 48 positions) or padded
    ("never"), with varlen pieces or not, shapes bucketed or not."""
    from types import SimpleNamespace

    from mpo_dist.batch import MicroBatch
    from mpo_dist.data.layout import layout_for

    data = SimpleNamespace(packing=packing, pack_tokens=48, padding_side="right", pad_to_multiple_of=1,
                           bucket_shapes=bucket_shapes)
    def cost(rows: int, width: int, dense: bool, attended_pairs: int | None = None) -> float:
        return rows * width * (64 + width)  # a stand-in for flops.CostModel.layout_cost

    layout = layout_for(data, pad_token_id=0, cost=cost, varlen=varlen)
    return MicroBatch.build(*collated_samples(), layout)
