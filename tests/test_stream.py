"""The streaming loader: exactly-once splits, equal batch counts, exact mid-epoch resume, lockstep join."""

from __future__ import annotations

import collections
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mpo_dist.config import DataConfig
from mpo_dist.data.loader import build_dref_loader, build_pair_loader
from mpo_dist.data.sampler import BatchSpec, plan_epoch
from mpo_dist.data.samples import PairSource
from mpo_dist.data.shards import ShardError
from mpo_dist.errors import InputError
from shard_factory import make_dref, make_pairs, make_reference, ref_logps_of

UNEVEN = [7, 13, 5, 11, 2]  # 5 shards of different sizes, 38 samples


@pytest.fixture()
def shards(tmp_path: Path):
    keys = make_pairs(tmp_path / "pairs", UNEVEN)
    make_reference(tmp_path / "ref", tmp_path / "pairs")
    return tmp_path, keys


def data_config(root: Path, **overrides) -> DataConfig:
    values = dict(pairs=str(root / "pairs"), reference=str(root / "ref"), batch_size=3, num_workers=2, shuffle_window=8)
    values.update(overrides)
    return DataConfig(**values)


def loader_for(root: Path, rank: int, world: int, epochs: int | None = 1, **overrides):
    return build_pair_loader(data_config(root, **overrides), seed=7, dp_rank=rank, dp_world_size=world,
                             num_epochs=epochs)


def run(loader, limit: int | None = None) -> list[dict]:
    return list(itertools.islice(loader, limit))


def flat(batches, field="keys", with_pad=False):
    out = []
    for batch in batches:
        for i, key in enumerate(batch["keys"]):
            if with_pad or not bool(batch["is_pad"][i]):
                out.append(key if field == "keys" else (key, bool(batch["is_pad"][i])))
    return out


@pytest.mark.dist
@pytest.mark.parametrize("batching", [{}, {"batching": "tokens", "max_tokens": 200}])
def test_every_sample_once_per_epoch_over_2_ranks_x_2_workers(shards, batching):
    root, keys = shards
    per_rank = [run(loader_for(root, rank, 2, **batching)) for rank in range(2)]
    seen = flat(per_rank[0]) + flat(per_rank[1])
    assert collections.Counter(seen) == collections.Counter(keys)  # every sample exactly once
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # no rank runs out first
    if not batching:
        assert all(len(b["keys"]) == 3 for r in per_rank for b in r)
        padded = [k for r in per_rank for k, pad in flat(r, "pad", with_pad=True) if pad]
        assert len(padded) == 42 - 38  # 38 samples padded to 2 ranks x 3 x 7 batches, flagged
    else:
        for batch in per_rank[0] + per_rank[1]:
            width = max(len(p) + len(r) for p, c, x in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
                        for r in (c, x))
            assert 2 * width * len(batch["keys"]) <= 200  # within the budget of padded tokens


@pytest.mark.dist
def test_drop_tail_reads_each_sample_at_most_once(shards):
    root, keys = shards
    per_rank = [run(loader_for(root, rank, 2, tail="drop")) for rank in range(2)]
    seen = flat(per_rank[0]) + flat(per_rank[1])
    assert len(seen) == len(set(seen)) == 36 and set(seen) <= set(keys)
    assert not any(bool(b["is_pad"].any()) for r in per_rank for b in r)


@pytest.mark.dist
def test_rank_stream_does_not_depend_on_num_workers(shards):
    root, _ = shards
    streams = [flat(run(loader_for(root, 1, 2, num_workers=workers)), with_pad=True) for workers in (0, 1, 2, 3)]
    assert all(stream == streams[0] for stream in streams)


@pytest.mark.dist
def test_epochs_reshuffle_and_seed_fixes_order(shards):
    root, keys = shards
    stream = run(loader_for(root, 0, 1, epochs=2, batch_size=2))
    epochs = [flat([b for b in stream if b["epoch"] == e]) for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(keys)
    assert epochs[0] != epochs[1]
    assert flat(run(loader_for(root, 0, 1, epochs=2, batch_size=2))) == epochs[0] + epochs[1]


@pytest.mark.dist
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batching", [{}, {"batching": "tokens", "max_tokens": 160}])
def test_resume_mid_epoch_equals_uninterrupted(shards, workers, batching):
    root, _ = shards
    make = lambda: loader_for(root, 1, 2, epochs=3, num_workers=workers, **batching)
    full = run(make())
    per_epoch = len(full) // 3
    for cut in [1, per_epoch // 2, per_epoch - 1, per_epoch, per_epoch + 3, len(full) - 1]:
        first = make()
        iterator = iter(first)
        for _ in range(cut):
            next(iterator)
        state = first.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        rest = run(resumed)
        assert len(rest) == len(full) - cut, f"cut {cut}"
        for expected, got in zip(full[cut:], rest):
            assert expected["keys"] == got["keys"] and expected["epoch"] == got["epoch"]
            assert expected["epoch_progress"] == got["epoch_progress"]
            for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
                assert all(np.array_equal(a, b) for a, b in zip(expected[name], got[name]))
            assert torch.equal(expected["is_pad"], got["is_pad"])


@pytest.mark.dist
@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_progress_is_the_fraction_of_the_epoch_done(shards, workers):
    root, _ = shards
    batches = run(loader_for(root, 1, 2, epochs=2, num_workers=workers))
    n = 7  # 38 samples padded to 42 = 2 ranks x 7 batches of 3
    assert len(batches) == 2 * n
    assert [b["epoch_progress"] for b in batches] == pytest.approx([k / n for k in range(1, 2 * n + 1)])
    assert [b["epoch"] for b in batches] == [0] * n + [1] * n


@pytest.mark.dist
def test_loader_manifest_and_epoch_progress(shards):
    root, keys = shards
    loader = loader_for(root, 0, 1, epochs=2)
    assert loader.manifest.kind == "pairs" and loader.manifest.num_samples == len(keys)
    batches = run(loader)
    second = [b for b in batches if b["epoch"] == 1]
    assert {b["epoch"] for b in batches} == {0, 1} and sorted(flat(second)) == sorted(keys)
    assert second[0]["epoch_progress"] == pytest.approx(1 + 1 / len(second))


@pytest.mark.unit
def test_importing_the_loader_leaves_warning_filters_alone():
    import importlib
    import warnings

    import mpo_dist.data.loader as loader_module

    before = list(warnings.filters)
    importlib.reload(loader_module)
    assert warnings.filters == before


@pytest.mark.dist
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_resume_with_other_num_workers_continues_exactly(shards, workers):
    """The position is global (epoch, batches done), not per worker: any number of workers resumes it."""
    root, _ = shards
    full = run(loader_for(root, 0, 2, epochs=2, num_workers=2))
    first = loader_for(root, 0, 2, epochs=2, num_workers=2)
    iterator = iter(first)
    for _ in range(5):
        next(iterator)
    other = loader_for(root, 0, 2, epochs=2, num_workers=workers)
    other.load_state_dict(first.state_dict())
    assert other.resume_note is None
    assert [b["keys"] for b in run(other)] == [b["keys"] for b in full[5:]]


@pytest.mark.unit
def test_token_budget_plans_equal_counts_for_all_ranks():
    sizes = [50, 31, 77]
    lengths = np.random.default_rng(0).integers(5, 100, size=sum(sizes))
    spec = BatchSpec(max_tokens=400, sequences_per_sample=2, shuffle_window=32)
    plans = [plan_epoch(sizes, lengths, spec, seed=3, epoch=0, dp_rank=r, dp_world_size=4) for r in range(4)]
    assert len({len(plan.batches) for plan in plans}) == 1
    real = [int(plan.ids[p]) for plan in plans for b in plan.batches for p, pad in zip(b.positions, b.is_pad) if not pad]
    assert sorted(real) == list(range(sum(sizes)))
    with pytest.raises(InputError, match="data.max_tokens"):
        plan_epoch(sizes, lengths, BatchSpec(max_tokens=100, sequences_per_sample=2), seed=0, epoch=0, dp_rank=0, dp_world_size=1)


@pytest.mark.dist
def test_sample_over_the_token_budget_fails_when_the_loader_is_built(shards):
    root, _ = shards
    with pytest.raises(InputError, match="exceeds data.max_tokens=40"):
        loader_for(root, 0, 1, batching="tokens", max_tokens=40)


@pytest.mark.unit
def test_too_little_data_for_one_batch_per_rank(tmp_path):
    make_pairs(tmp_path / "pairs", [3])
    with pytest.raises(InputError, match="fewer than one batch"):
        build_pair_loader(DataConfig(pairs=str(tmp_path / "pairs"), batch_size=2, tail="drop"), seed=0, dp_rank=0,
                          dp_world_size=2)


# ------------------------------------------------------------------------------------ lockstep join


@pytest.mark.dist
def test_reference_log_probs_join_by_key(shards):
    root, _ = shards
    for batch in run(loader_for(root, 0, 1)):
        for i, key in enumerate(batch["keys"]):
            chosen, rejected = ref_logps_of(key)
            assert batch["ref_chosen_logps"][i].item() == pytest.approx(chosen)
            assert batch["ref_rejected_logps"][i].item() == pytest.approx(rejected)


@pytest.mark.unit
def test_reference_with_other_keys_is_an_error_naming_shard_and_key(shards):
    root, _ = shards
    from mpo_dist.data.samples import write_reference_shard

    keys = [f"s001-{i:04d}" for i in range(13)]
    keys[4], keys[5] = keys[5], keys[4]  # same count, same names, one pair of keys swapped
    write_reference_shard(root / "ref" / "shard-000001.tar", keys, [0.0] * 13, [0.0] * 13, [1] * 13, [1] * 13)
    source = PairSource(root / "pairs", root / "ref")
    with pytest.raises(ShardError, match=r"shard-000001\.tar: sample 4 has key 's001-0005'.*'s001-0004'"):
        for sample_id in range(len(source.shards)):
            source.read(sample_id)


@pytest.mark.unit
def test_reference_count_tokenizer_and_missing_shard_errors(shards):
    root, _ = shards
    import json

    manifest_path = root / "ref" / "manifest.json"
    original = json.loads(manifest_path.read_text())

    def with_manifest(edit):
        manifest = json.loads(json.dumps(original))
        edit(manifest)
        manifest_path.write_text(json.dumps(manifest))

    with_manifest(lambda m: m["shards"][2].update(num_samples=4))
    with pytest.raises(ShardError, match=r"shard-000002\.tar: 4 samples, but pairs shard .* has 5"):
        PairSource(root / "pairs", root / "ref")
    with_manifest(lambda m: m.update(tokenizer_hash="sha256:other"))
    with pytest.raises(ShardError, match="tokenizer sha256:other differs"):
        PairSource(root / "pairs", root / "ref")
    with_manifest(lambda m: m["shards"].pop(3))
    with pytest.raises(ShardError, match=r"no reference shard for pairs shard shard-000003\.tar"):
        PairSource(root / "pairs", root / "ref")
    with_manifest(lambda m: m.update(kind="pairs"))
    with pytest.raises(ShardError, match="holds 'pairs' shards, expected 'ref_logps'"):
        PairSource(root / "pairs", root / "ref")


# ------------------------------------------------------------------------------------ damaged files


def read_all(root: Path):
    source = PairSource(root / "pairs")
    return [source.read(i) for i in range(len(source.shards))]


@pytest.mark.unit
def test_truncated_tar_names_the_file(shards):
    root, _ = shards
    path = root / "pairs" / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"shard-000001\.tar: .*(corrupt|truncated)"):
        read_all(root)


@pytest.mark.unit
def test_garbage_tar_names_the_file(shards):
    root, _ = shards
    path = root / "pairs" / "shard-000003.tar"
    path.write_bytes(b"\x00garbage" * 700)
    with pytest.raises(ShardError, match=r"shard-000003\.tar"):
        read_all(root)


@pytest.mark.unit
def test_corrupt_record_names_file_and_key(shards):
    root, _ = shards
    path = root / "pairs" / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    where = data.find(b"MPO2", data.find(b"s000-0002.pair"))
    data[where : where + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sample 's000-0002'"):
        read_all(root)


@pytest.mark.unit
def test_missing_shard_and_stale_manifest(shards):
    root, _ = shards
    (root / "pairs" / "shard-000004.tar").unlink()
    with pytest.raises(ShardError, match=r"shard-000004\.tar: listed in the manifest but missing"):
        PairSource(root / "pairs")
    make_pairs(root / "more", [4])
    import json

    manifest = json.loads((root / "more" / "manifest.json").read_text())
    manifest["shards"][0].update(num_samples=6, lengths=[1] * 6)
    (root / "more" / "manifest.json").write_text(json.dumps(manifest))
    source = PairSource(root / "more")
    with pytest.raises(ShardError, match=r"ends after 4 samples but its manifest lists 6"):
        [source.read(i) for i in range(6)]


# ------------------------------------------------------------------------------------ collation, D_ref


@pytest.mark.unit
def test_collated_batch_keeps_each_samples_tokens_in_order(shards):
    root, _ = shards
    source = PairSource(root / "pairs")
    batch = run(loader_for(root, 0, 1, shuffle=False, num_workers=0))[0]
    samples = [source.read(i) for i in range(3)]
    assert batch["keys"] == [s["key"] for s in samples]
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert [ids.tolist() for ids in batch[name]] == [s[name].tolist() for s in samples]


@pytest.mark.unit
def test_batches_carry_the_response_token_counts(shards, tmp_path):
    """chosen_lengths / rejected_lengths (pairs) and response_lengths (D_ref): float32 response token
    counts, one per sample in batch order, padding samples included (what length normalisation divides by)."""
    root, _ = shards
    counted = 0
    for batch in run(loader_for(root, 0, 2, num_workers=0)):  # 38 samples over 2 ranks x 3: a padded tail
        for name, ids in (("chosen_lengths", "chosen_ids"), ("rejected_lengths", "rejected_ids")):
            assert batch[name].dtype == torch.float32
            assert batch[name].tolist() == [float(len(x)) for x in batch[ids]]
        counted += int(batch["is_pad"].sum())
    assert counted > 0  # the padded duplicates carry their counts too
    make_dref(tmp_path / "dref", [5, 4])
    config = DataConfig(pairs="unused", dref=str(tmp_path / "dref"), dref_batch_size=4, num_workers=0)
    for batch in run(build_dref_loader(config, seed=0, dp_rank=0, dp_world_size=1), 3):
        assert batch["response_lengths"].dtype == torch.float32
        assert batch["response_lengths"].tolist() == [float(len(x)) for x in batch["response_ids"]]
        assert len(set(batch["response_lengths"].tolist())) > 1  # responses of 1..8 tokens: not all alike


@pytest.mark.unit
def test_dref_stream_cycles_past_one_epoch(tmp_path):
    keys = make_dref(tmp_path / "dref", [5, 4])
    config = DataConfig(pairs="unused", dref=str(tmp_path / "dref"), dref_batch_size=2, num_workers=0)
    loader = build_dref_loader(config, seed=0, dp_rank=0, dp_world_size=1,
                               tokenizer_hash="sha256:test")
    batches = run(loader, 12)  # 5 batches per epoch: more than two epochs
    assert [b["epoch"] for b in batches] == [0] * 5 + [1] * 5 + [2] * 2
    assert sorted(flat(batches[:5])) == sorted(keys)
    assert loader.manifest.kind == "dref" and loader.manifest.tokenizer_hash == "sha256:test"
    assert batches[0]["ref_logps"].dtype == torch.float32 and len(batches[0]["response_ids"]) == 2
    with pytest.raises(ShardError, match="data.dref .* differs from the pairs'"):
        build_dref_loader(config, seed=0, dp_rank=0, dp_world_size=1, tokenizer_hash="sha256:x")


@pytest.mark.unit
def test_resume_with_another_global_batch_says_what_is_repeated(shards):
    """2 ranks x 3 (a global batch of 6) resumed on 3 ranks x 3 (9): 6 samples done are not a whole
    number of 9-sample rounds, so they are trained on again, and the note says so."""
    root, _ = shards
    first = loader_for(root, 0, 2, num_workers=0)
    next(iter(first))
    resumed = loader_for(root, 0, 3, num_workers=0)
    resumed.load_state_dict(first.state_dict())
    assert "written by 2 data-parallel ranks, now 3" in resumed.resume_note
    assert "the last 6 samples before it are trained on again" in resumed.resume_note
    assert next(iter(resumed))["epoch_batch"] == 0


@pytest.mark.dist
def test_fewer_batches_per_epoch_than_workers_keeps_streaming(tmp_path):
    """One batch per epoch and two workers: batches alternate between workers across epochs, and the
    stream equals the single-process one (no worker waits for a batch that never comes)."""
    make_dref(tmp_path / "dref", [3])
    config = lambda workers: DataConfig(pairs="unused", dref=str(tmp_path / "dref"), dref_batch_size=2,
                                        num_workers=workers)
    streams = []
    for workers in (0, 2):
        loader = build_dref_loader(config(workers), seed=0, dp_rank=0, dp_world_size=2)
        batches = run(loader, 5)
        assert [b["epoch"] for b in batches] == [0, 1, 2, 3, 4]
        streams.append([b["keys"] for b in batches])
    assert streams[0] == streams[1]


@pytest.mark.unit
@pytest.mark.parametrize("change", [{"shuffle_window": 4}, {"tail": "drop"}, {"batching": "tokens", "max_tokens": 200}])
def test_resume_with_other_batching_is_refused(shards, change):
    root, _ = shards
    first = loader_for(root, 0, 2, num_workers=0)
    next(iter(first))
    resumed = loader_for(root, 0, 2, num_workers=0, **change)
    with pytest.raises(InputError, match="batching settings"):
        resumed.load_state_dict(first.state_dict())
        next(iter(resumed))


# ------------------------------------------------------------------------------------ values checked on read


def _rewrite(path: Path, kind: str, count: int, change) -> None:
    """Rewrite a shard (with valid checksums) through `change(index, key, meta, arrays)`."""
    from mpo_dist.data.shards import ShardCursor, ShardWriter

    samples = list(ShardCursor(path, kind, count))
    with ShardWriter(path, kind) as writer:
        for index, (key, meta, arrays) in enumerate(samples):
            writer.write(*change(index, key, dict(meta), {name: np.array(a) for name, a in arrays.items()}))


@pytest.mark.unit
@pytest.mark.parametrize("edit, expected", [
    (lambda meta: meta.update(chosen_logp=float("nan")), "field 'chosen_logp' is nan (not finite)"),
    (lambda meta: meta.update(rejected_logp=float("-inf")), "field 'rejected_logp' is -inf (not finite)"),
    (lambda meta: meta.pop("chosen_logp"), "field 'chosen_logp' is missing"),
])
def test_bad_reference_values_are_named_errors_on_read(shards, edit, expected):
    root, _ = shards
    _rewrite(root / "ref" / "shard-000000.tar", "ref_logps", 7,
             lambda i, key, meta, arrays: (key, (edit(meta), meta)[1] if i == 2 else meta, arrays))
    source = PairSource(root / "pairs", root / "ref")
    with pytest.raises(ShardError, match=rf"ref/shard-000000\.tar: sample 's000-0002': {re.escape(expected)}"):
        [source.read(i) for i in range(7)]


@pytest.mark.unit
def test_token_id_beyond_the_vocabulary_is_a_named_error_on_read(shards):
    root, _ = shards

    def damage(index, key, meta, arrays):
        if index == 1:
            arrays["rejected_ids"][0] = 100  # the manifest records a 100-token vocabulary
        return key, meta, arrays

    _rewrite(root / "pairs" / "shard-000002.tar", "pairs", 5, damage)
    with pytest.raises(ShardError, match=r"pairs/shard-000002\.tar: sample 's002-0001': array 'rejected_ids' holds "
                                         r"token id 100 outside the vocabulary of 100 tokens"):
        read_all(root)
    with pytest.raises(ShardError, match="of 50 tokens"):  # the model's, when smaller
        PairSource(root / "pairs", vocab_size=50).read(0)


@pytest.mark.unit
def test_dref_nan_logp_ref_is_a_named_error_on_read(tmp_path):
    from mpo_dist.data.samples import DrefSource

    make_dref(tmp_path / "dref", [3])
    _rewrite(tmp_path / "dref" / "shard-000000.tar", "dref", 3,
             lambda i, key, meta, arrays: (key, {**meta, "logp_ref": float("nan")} if i == 1 else meta, arrays))
    source = DrefSource(tmp_path / "dref")
    source.read(0)
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sample 'd000-0001': field 'logp_ref' is nan"):
        source.read(1)


@pytest.mark.unit
def test_record_without_meta_or_with_a_flipped_bit_names_shard_and_key(shards):
    import json as json_lib
    import struct
    import zlib

    from mpo_dist.data.shards import decode_record

    root, _ = shards
    header = json_lib.dumps({"arrays": []}).encode()
    body = struct.pack("<I", len(header)) + header
    with pytest.raises(ValueError, match="no 'meta' object"):
        decode_record(b"MPO2" + struct.pack("<I", zlib.crc32(body)) + body)
    with pytest.raises(ValueError, match="malformed record header"):
        decode_record(b"MPO2\x00")
    path = root / "pairs" / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    where = data.find(b"s000-0004", data.find(b"s000-0004.pair") + 20)  # the key inside the record's meta
    data[where + 1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sample 's000-0004' \(index 4\) is corrupt .*checksum mismatch"):
        read_all(root)


@pytest.mark.unit
def test_a_record_without_a_checksum_is_refused(tmp_path):
    """Format 1 records (`MPO1`, no checksum) were never released: not read, never misread."""
    import json as json_lib
    import struct

    from mpo_dist.data.shards import decode_record

    header = json_lib.dumps({"meta": {"x": 1}, "arrays": [["ids", "<i4", 2]]}).encode()
    record = b"MPO1" + struct.pack("<I", len(header)) + header + np.array([5, 6], np.int32).tobytes()
    with pytest.raises(ValueError, match=r"not a packed mpo_dist record \(bad magic bytes\)"):
        decode_record(record)


@pytest.mark.unit
def test_damaged_tar_header_on_read_is_damage_not_truncation(shards):
    import tarfile

    root, _ = shards
    path = root / "pairs" / "shard-000001.tar"
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[3].offset
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"shard-000001\.tar: damaged tar header at byte {offset} \(after 3 samples\)"):
        read_all(root)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["../../victim.tar", "/tmp/victim.tar", "sub/shard.tar", "..", ""])
def test_shard_names_must_be_plain_file_names(shards, name):
    import json as json_lib

    root, _ = shards
    manifest = json_lib.loads((root / "pairs" / "manifest.json").read_text())
    manifest["shards"][1]["name"] = name
    (root / "pairs" / "manifest.json").write_text(json_lib.dumps(manifest))
    with pytest.raises(ShardError, match=rf"pairs/manifest\.json: shard name '{name}' is not a plain file name"):
        PairSource(root / "pairs")
