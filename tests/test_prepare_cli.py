"""tools/prepare_pairs.py as users run it: one-line errors with exit code 2, the default prompt limit,
and two torchrun processes writing the same files as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mpo_dist.data.shards import Manifest
from mpo_dist.producers.prepare import PrepareOptions
from prepare_support import PER_SHARD, read_samples, tree
from support import REPO, SUBPROCESS_ENV

pytestmark = pytest.mark.e2e


def run_prepare_pairs(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "prepare_pairs.py"), *map(str, args)],
                          env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["input", "tokenizer", "lengths"])
def test_cli_exits_2_with_a_one_line_message(case, tmp_path, bad_jsonl, gpt2_dir):
    args = {"input": str(bad_jsonl), "tokenizer": str(gpt2_dir), "out": str(tmp_path / "out")}
    extra, expected = [], []
    if case == "input":
        args["input"], expected = str(tmp_path / "nope.jsonl"), ["--input", "nope.jsonl"]
    elif case == "tokenizer":
        args["tokenizer"], expected = str(tmp_path / "no-tokenizer"), ["no-tokenizer"]
    else:
        extra, expected = ["--max-length", "32", "--max-prompt-length", "32"], ["--max-prompt-length", "--max-length"]
    result = run_prepare_pairs(*[item for key, value in args.items() for item in (f"--{key}", value)], *extra)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("prepare_pairs: error:")
    for word in expected:
        assert word in line
    assert not (tmp_path / "out").exists()


def test_default_prompt_limit_follows_a_smaller_max_length(tmp_path, subset_jsonl, gpt2_dir):
    assert PrepareOptions().max_prompt_length == 512
    assert PrepareOptions(max_length=512).max_prompt_length == 256
    assert PrepareOptions(max_length=4096).max_prompt_length == 512
    assert PrepareOptions(max_length=512, max_prompt_length=400).max_prompt_length == 400
    out = tmp_path / "out"
    result = run_prepare_pairs("--input", subset_jsonl, "--tokenizer", gpt2_dir, "--out", out, "--max-length", 64)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = Manifest.read(out, "pairs")
    assert manifest.info["options"]["max_prompt_length"] == 32 and manifest.info["options"]["max_length"] == 64
    samples = read_samples(out)
    assert len(samples) == 199 and max(len(arrays["prompt_ids"]) for _, _, _, arrays in samples) == 32


def test_torchrun_two_processes_writes_the_same_files(tmp_path, pairs_run, pairs_jsonl, gpt2_dir):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               str(REPO / "tools" / "prepare_pairs.py"), "--input", str(pairs_jsonl), "--tokenizer", str(gpt2_dir),
               "--out", str(out), "--samples-per-shard", str(PER_SHARD)]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2307 records -> 2303 pairs in 8 shards" in result.stderr
    single, multi = tree(pairs_run[0]), tree(out)
    assert sorted(multi) == sorted(single)
    assert sum(name.endswith(".tar") and "/" not in name for name in multi) == 8
    for name in single:  # every shard tar, the stats, manifest.json and the report: byte-identical
        assert multi[name] == single[name], name
