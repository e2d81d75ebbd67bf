"""The loader under torchrun with gloo: 2 ranks x 2 workers, a collective per batch, 2 epochs."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shard_factory import make_pairs, make_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("batching", ["fixed", "tokens"])
def test_two_ranks_two_workers_exactly_once_without_hanging(tmp_path, batching):
    keys = make_pairs(tmp_path / "pairs", [7, 13, 5, 11, 2])
    make_reference(tmp_path / "ref", tmp_path / "pairs")
    out = tmp_path / "seen.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "distributed" / "loader_worker.py"), str(tmp_path), str(out), batching],
        check=True, env=env, timeout=240,
    )
    per_rank = json.loads(out.read_text())
    for epoch in (0, 1):
        real = [key for rank in per_rank for key, pad, e in rank if e == epoch and not pad]
        assert collections.Counter(real) == collections.Counter(keys)
