"""The loader under torchrun with gloo: 2 ranks x 2 workers, a collective per batch, 2 epochs."""

import collections
import json
import subprocess

import pytest

from support import REPO, SUBPROCESS_ENV, torchrun_command
from shard_factory import make_pairs, make_reference

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("batching", ["fixed", "tokens"])
def test_two_ranks_two_workers_exactly_once_without_hanging(tmp_path, batching):
    keys = make_pairs(tmp_path / "pairs", [7, 13, 5, 11, 2])
    make_reference(tmp_path / "ref", tmp_path / "pairs")
    out = tmp_path / "seen.json"
    worker = REPO / "tests" / "distributed" / "loader_worker.py"
    subprocess.run(torchrun_command(2, [str(worker), str(tmp_path), str(out), batching]),
                   check=True, env=SUBPROCESS_ENV, timeout=240)
    per_rank = json.loads(out.read_text())
    for epoch in (0, 1):
        real = [key for rank in per_rank for key, pad, e in rank["samples"] if e == epoch and not pad]
        assert collections.Counter(real) == collections.Counter(keys)
    # epoch_progress: the fraction of the epoch's batches done, e + 1/n, e + 2/n, ..., e + 1 (n: that
    # epoch's batches, the same on both ranks), in order although two workers made the batches.
    for epoch in (0, 1):
        values = [[p for e, p in rank["progress"] if e == epoch] for rank in per_rank]
        n = len(values[0])
        assert values[0] == values[1] == pytest.approx([epoch + k / n for k in range(1, n + 1)])
