"""tools/prepare_pairs.py --eval-fraction: a held-out split by a hash of the prompt text, written as
two complete pairs shard sets OUT/train and OUT/eval (issue 12, item 1).

On the real HH-RLHF harmless test split (2307 records, GPT-2 tokenizer): the sides are disjoint (in
keys and in prompts), their union is the unsplit kept set, and the split is the same whatever
--samples-per-shard and on 1 or 2 processes (byte-identical files). The reference scoring tool
accepts OUT/eval as --pairs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from support import REPO, SUBPROCESS_ENV, require_shared, run_tool, torchrun_command
from mpo_dist.producers.prepare import REPORT_NAME, SPLIT_RULE, STATS_DIR, split_side, split_value
from mpo_dist.data.shards import MANIFEST_NAME, Manifest, ShardCursor, shard_name
from mpo_dist.errors import InputError
from prepare_support import prepare, tree

FRACTION = 0.2
PER_SHARD = 300  # as prepare_support.PER_SHARD: pairs_run is the unsplit run


def read_samples(out: Path) -> dict[str, tuple[dict, dict]]:
    """key -> (meta, arrays) of every sample the manifest lists (the cursor checks each tar's count)."""
    samples = {}
    for shard in Manifest.read(out, "pairs").shards:
        cursor = ShardCursor(out / shard.name, "pairs", shard.num_samples)
        for key, meta, arrays in cursor:
            assert key not in samples
            samples[key] = (meta, arrays)
        cursor.close()
    return samples


def same_sample(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(np.array_equal(a[1][k], b[1][k]) for k in a[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pairs_run, pairs_jsonl, gpt2_dir) -> dict[str, tuple[Path, dict]]:
    """pairs.jsonl prepared unsplit (prepare_support's pairs_run, also with PER_SHARD), split with
    PER_SHARD, and split with another shard size."""
    root = tmp_path_factory.mktemp("split")
    made = {"unsplit": pairs_run}
    for name, options in {"split": {"samples_per_shard": PER_SHARD, "eval_fraction": FRACTION},
                          "split_128": {"samples_per_shard": 128, "eval_fraction": FRACTION}}.items():
        made[name] = root / name, prepare(pairs_jsonl, gpt2_dir, root / name, **options)
    return made


@pytest.mark.unit
def test_sides_are_disjoint_and_their_union_is_the_unsplit_kept_set(runs):
    unsplit = read_samples(runs["unsplit"][0])
    out, summary = runs["split"]
    train, held_out = read_samples(out / "train"), read_samples(out / "eval")
    assert not train.keys() & held_out.keys()
    train_prompts = {json.dumps(meta["prompt"]) for meta, _ in train.values()}
    eval_prompts = {json.dumps(meta["prompt"]) for meta, _ in held_out.values()}
    assert not train_prompts & eval_prompts  # no eval prompt is ever trained on
    union = {**train, **held_out}
    assert union.keys() == unsplit.keys()
    assert all(same_sample(union[key], unsplit[key]) for key in unsplit)
    # Each sample is on the side its prompt hash says.
    assert all(split_side(meta["prompt"], FRACTION) == "train" for meta, _ in train.values())
    assert all(split_side(meta["prompt"], FRACTION) == "eval" for meta, _ in held_out.values())

    assert summary["records"] == runs["unsplit"][1]["records"] == 2307
    assert summary["kept"] == runs["unsplit"][1]["kept"] == len(unsplit)
    assert summary["train"]["kept"] == len(train) and summary["eval"]["kept"] == len(held_out)
    # Every record not kept is reported on exactly one side.
    reports = [json.loads((out / side / REPORT_NAME).read_text()) for side in ("train", "eval")]
    dropped = sorted(e["where"] for r in reports for e in r["dropped_records"])
    unsplit_report = json.loads((runs["unsplit"][0] / REPORT_NAME).read_text())
    assert dropped == sorted(e["where"] for e in unsplit_report["dropped_records"])
    assert sum(r["records"] for r in reports) == 2307


@pytest.mark.unit
def test_fraction_is_roughly_respected(runs):
    out, summary = runs["split"]
    share = summary["eval"]["kept"] / summary["kept"]
    assert abs(share - FRACTION) < 0.04, share
    prompts = [meta["prompt"] for meta, _ in read_samples(runs["unsplit"][0]).values()]
    assert abs(np.mean([split_value(p) < FRACTION for p in set(prompts)]) - FRACTION) < 0.04


@pytest.mark.unit
def test_manifests_record_the_split(runs):
    out, _ = runs["split"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["eval", "train"]
    for side in ("train", "eval"):
        manifest = Manifest.read(out / side, "pairs")
        assert manifest.info["split"] == {"fraction": FRACTION, "rule": SPLIT_RULE, "side": side,
                                          "held_out": side == "eval"}
        assert (out / side / REPORT_NAME).is_file() and (out / side / MANIFEST_NAME).is_file()
    # An unsplit output records no split (and is laid out as before).
    unsplit = Manifest.read(runs["unsplit"][0], "pairs")
    assert "split" not in unsplit.info and "eval_fraction" not in unsplit.info["options"]


@pytest.mark.unit
def test_split_does_not_depend_on_samples_per_shard(runs):
    for side in ("train", "eval"):
        a, b = read_samples(runs["split"][0] / side), read_samples(runs["split_128"][0] / side)
        assert a.keys() == b.keys()
        assert all(same_sample(a[key], b[key]) for key in a)
    assert len(Manifest.read(runs["split_128"][0] / "train").shards) > len(Manifest.read(runs["split"][0] / "train").shards)


@pytest.mark.e2e
def test_two_processes_write_the_same_files(tmp_path, runs, pairs_jsonl, gpt2_dir):
    out = tmp_path / "out"
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    command = torchrun_command(2, [str(REPO / "tools" / "prepare_pairs.py"), "--input", str(pairs_jsonl),
                                   "--tokenizer", str(gpt2_dir), "--out", str(out), "--samples-per-shard", str(PER_SHARD),
                                   "--eval-fraction", str(FRACTION)])
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "split 2307 records by prompt hash" in result.stderr
    single, multi = tree(runs["split"][0]), tree(out)
    assert sorted(multi) == sorted(single)
    for name in single:  # shards, stats, manifests and reports of both sides: byte-identical
        assert multi[name] == single[name], name


@pytest.mark.unit
def test_rerun_completes_a_missing_side_shard_identically(tmp_path, runs, pairs_jsonl, gpt2_dir):
    out = tmp_path / "out"
    shutil.copytree(runs["split"][0], out)
    before = tree(out)
    (out / "eval" / shard_name(2)).unlink()
    (out / "eval" / STATS_DIR / f"{shard_name(2)}.json").unlink()
    (out / "eval" / MANIFEST_NAME).unlink()
    assert prepare(pairs_jsonl, gpt2_dir, out, samples_per_shard=PER_SHARD, eval_fraction=FRACTION) == runs["split"][1]
    assert tree(out) == before
    with pytest.raises(InputError, match="other settings"):  # another fraction never mixes into this folder
        prepare(pairs_jsonl, gpt2_dir, out, samples_per_shard=PER_SHARD, eval_fraction=0.3)


@pytest.mark.e2e
@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_a_bad_fraction_is_refused(tmp_path, pairs_jsonl, gpt2_dir, fraction):
    with pytest.raises(InputError, match="--eval-fraction"):
        prepare(pairs_jsonl, gpt2_dir, tmp_path / "out", eval_fraction=fraction)
    assert not (tmp_path / "out").exists()
    result = run_tool("prepare_pairs.py", "--input", pairs_jsonl, "--tokenizer", gpt2_dir, "--out", tmp_path / "cli",
                      "--eval-fraction", fraction)
    assert result.returncode == 2 and "--eval-fraction" in result.stderr


@pytest.mark.e2e
def test_score_reference_accepts_the_eval_side(tmp_path):
    model = require_shared("stories260K")
    records = require_shared("hh-rlhf-harmless-test", "pairs.jsonl").read_text().splitlines()[:60]
    (tmp_path / "hh.jsonl").write_text("\n".join(records) + "\n")
    prepare(tmp_path / "hh.jsonl", model, tmp_path / "pairs", samples_per_shard=16, max_length=128,
            max_prompt_length=64, eval_fraction=0.3)
    for side in ("eval", "train"):
        result = run_tool("score_reference.py", "--model", model, "--pairs", tmp_path / "pairs" / side,
                          "--out", tmp_path / f"reference_{side}", "--batch-size", 8)
        assert result.returncode == 0, result.stderr[-3000:]
        pairs, reference = Manifest.read(tmp_path / "pairs" / side, "pairs"), Manifest.read(tmp_path / f"reference_{side}")
        assert reference.num_samples == pairs.num_samples > 0
        assert [s.name for s in reference.shards] == [s.name for s in pairs.shards]
