"""A tar member whose name is a path (`/abs/x.pair`, `sub/x.pair`, `../x.pair`) is no sample: the
pre-flight, the readers and the tools that score and sample shards refuse it as an unexpected member,
naming the shard, instead of taking `/abs/x` as a key and failing later with a raw ValueError."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from support import QUIET, run_tool
from mpo_dist.data.preflight import preflight_check
from mpo_dist.data.shards import Manifest, ShardCursor, ShardError
from shard_factory import make_pairs, make_reference

PATH_NAMES = ["/abs/x.pair", "sub/x.pair", "../x.pair", ".pair"]


def rename_member(path: Path, index: int, name: str) -> None:
    """Rewrite a shard with member `index` renamed to `name`, its bytes unchanged (no writer of ours
    would write such a name: tarfile does)."""
    with tarfile.open(path) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for position, (member, data) in enumerate(members):
            if position == index:
                member.name = name
            tar.addfile(member, io.BytesIO(data))


@pytest.mark.unit
@pytest.mark.parametrize("name", PATH_NAMES)
def test_preflight_refuses_a_member_named_by_a_path(tmp_path, name):
    make_pairs(tmp_path / "pairs", [4, 4])
    make_reference(tmp_path / "ref", tmp_path / "pairs")
    rename_member(tmp_path / "pairs" / "shard-000001.tar", 2, name)
    with pytest.raises(ShardError) as error:
        preflight_check(tmp_path / "pairs", tmp_path / "ref", vocab_size=100)
    assert f"pairs/shard-000001.tar: unexpected member '{name}' at index 2" in str(error.value)


@pytest.mark.unit
@pytest.mark.parametrize("name", PATH_NAMES)
def test_reading_a_member_named_by_a_path_is_a_shard_error(tmp_path, name):
    make_pairs(tmp_path / "pairs", [4])
    path = tmp_path / "pairs" / "shard-000000.tar"
    rename_member(path, 1, name)
    with pytest.raises(ShardError, match=f"shard-000000.tar: unexpected member '{name}' at index 1"):
        list(ShardCursor(path, "pairs", 4))


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory) -> dict[str, Path]:
    """A few toy pairs and the tiny model whose tokenizer made them (what the tools need, no more)."""
    from mpo_dist.producers.prepare import PrepareOptions, prepare_pairs
    from mpo_dist.data.toy_task import write_toy_task

    root = tmp_path_factory.mktemp("toy-names")
    pairs_jsonl, model = write_toy_task(root / "toy", num_records=24, seed=0)
    prepare_pairs(pairs_jsonl, model, root / "pairs", PrepareOptions(samples_per_shard=8, max_length=64), log=QUIET)
    return {"model": model, "pairs": root / "pairs"}


@pytest.mark.e2e
@pytest.mark.parametrize("tool, extra", [("score_reference.py", []),
                                         ("sample_reference.py", ["--num-samples", 1, "--max-new-tokens", 4])])
def test_tools_refuse_a_member_with_an_absolute_name_in_one_line(toy_pairs, tmp_path, tool, extra):
    pairs = tmp_path / "pairs"
    shutil.copytree(toy_pairs["pairs"], pairs)
    shard = Manifest.read(pairs).shards[0].name
    rename_member(pairs / shard, 3, "/abs/x.pair")
    result = run_tool(tool, "--model", toy_pairs["model"], "--pairs", pairs, "--out", tmp_path / "out",
                      "--dtype", "float32", *extra)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith(f"{tool[:-3]}: error: ")]
    assert f"{shard}: unexpected member '/abs/x.pair' at index 3" in line, line
