"""The pre-flight shard check and the provenance check: every damaged or stale input is refused
before training, with one line per problem naming shard, key and field."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest

from support import QUIET, free_port
from mpo_dist.data.preflight import check_provenance, check_training_inputs, preflight_check
from mpo_dist.data.shards import FORMAT_VERSION, Manifest, ShardError, manifest_fingerprint
from mpo_dist.errors import InputError
from shard_factory import make_dref, make_pairs, make_reference, make_sampled_dref, rewrite

SIZES = [5, 6, 4]


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    make_pairs(tmp_path / "pairs", SIZES)
    make_reference(tmp_path / "ref", tmp_path / "pairs")
    make_sampled_dref(tmp_path / "dref", tmp_path / "pairs", per_pair=2)
    return tmp_path


def check(root: Path, **kwargs):
    kwargs.setdefault("vocab_size", 100)
    return preflight_check(root / "pairs", root / "ref", root / "dref", **kwargs)


def refused(root: Path, *patterns: str, **kwargs) -> str:
    with pytest.raises(ShardError) as error:
        check(root, **kwargs)
    message = str(error.value)
    assert message.startswith("pre-flight shard check found")
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    return message


def member_offsets(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {member.name.partition(".")[0]: member for member in tar.getmembers()}


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------ a clean set


@pytest.mark.unit
def test_a_clean_set_passes_and_counts_what_it_read(root):
    report = check(root)
    assert (report.shards, report.pairs, report.records) == (9, 15, 15 + 15 + 30)
    lines = []
    assert check_training_inputs(root / "pairs", root / "ref", root / "dref", vocab_size=100, log=lines.append)
    assert lines and lines[-1].startswith("pre-flight: rank 0 of 1 checked 9 shard files, 60 records (15 pairs)")
    assert check_training_inputs(root / "pairs", root / "ref", preflight=False, log=lines.append) is None


@pytest.mark.unit
def test_ranks_split_the_shards(root):
    reports = [check(root, rank=rank, world_size=2) for rank in range(2)]
    assert sum(r.pairs for r in reports) == 15 and all(r.pairs for r in reports)


@pytest.mark.unit
def test_a_hand_made_dref_is_checked_on_its_own(tmp_path):
    make_pairs(tmp_path / "pairs", SIZES)
    make_reference(tmp_path / "ref", tmp_path / "pairs")
    make_dref(tmp_path / "dref", [3, 2])
    assert check(tmp_path).records == 15 + 15 + 5


# ------------------------------------------------------------------------------ damaged shards (issue 11)


@pytest.mark.unit
def test_truncated_tar(root):
    path = root / "pairs" / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(root, "pairs/shard-000001.tar", "truncated")


@pytest.mark.unit
def test_zero_byte_shard(root):
    (root / "ref" / "shard-000002.tar").write_bytes(b"")
    refused(root, "ref/shard-000002.tar: shard file is empty (0 bytes)")


@pytest.mark.unit
def test_reference_keys_out_of_order(root):
    def swap(index, key, meta, arrays):
        other = {1: "s001-0002", 2: "s001-0001"}.get(index, key)
        return other, meta, arrays

    rewrite(root / "ref" / "shard-000001.tar", "ref_logps", swap)
    refused(root, "ref/shard-000001.tar: sample 1 has key 's001-0002'", "has 's001-0001'", "out of order or missing")


@pytest.mark.unit
def test_reference_key_missing(root):
    rewrite(root / "ref" / "shard-000000.tar", "ref_logps", lambda i, *rest: None if i == 2 else rest)
    refused(root, "ref/shard-000000.tar: sample 2 has key 's000-0003'", "pairs/shard-000000.tar has 's000-0002'")


@pytest.mark.unit
@pytest.mark.parametrize("count, expected", [(7, "ends after 6 samples but its manifest lists 7"),
                                             (5, "holds more samples than the 5 its manifest lists")])
def test_manifest_count_that_does_not_match_the_tar(root, count, expected):
    edit_manifest(root / "pairs", lambda m: m["shards"][1].update(num_samples=count, lengths=[9] * count))
    edit_manifest(root / "ref", lambda m: m["shards"][1].update(num_samples=count))
    refused(root, f"pairs/shard-000001.tar: {expected}")


@pytest.mark.unit
def test_damaged_tar_header_is_damage_not_truncation(root):
    path = root / "pairs" / "shard-000002.tar"
    header = member_offsets(path)["s002-0002"].offset
    data = bytearray(path.read_bytes())
    data[header + 3] ^= 0x04  # a bit of the member name: the header checksum no longer matches
    path.write_bytes(bytes(data))
    message = refused(root, f"pairs/shard-000002.tar: damaged tar header at byte {header} (after 2 samples)")
    assert "ends after" not in message


@pytest.mark.unit
def test_flipped_bit_in_an_in_range_token_id(root):
    path = root / "pairs" / "shard-000000.tar"
    member = member_offsets(path)["s000-0003"]
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size - 4] ^= 0x01  # low bit of the last rejected id: still in 0..99
    path.write_bytes(bytes(data))
    refused(root, "pairs/shard-000000.tar: sample 's000-0003' (index 3) is corrupt", "checksum mismatch")


@pytest.mark.unit
def test_nan_reference_log_prob(root):
    def poison(index, key, meta, arrays):
        if index == 3:
            meta["rejected_logp"] = math.nan
        return key, meta, arrays

    rewrite(root / "ref" / "shard-000001.tar", "ref_logps", poison)
    refused(root, "ref/shard-000001.tar: sample 's001-0003': field 'rejected_logp' is nan (not finite)")


@pytest.mark.unit
@pytest.mark.parametrize("folder, option, created_by, maker", [
    ("pairs", "data.pairs", "tools/prepare_pairs.py", "tools/prepare_pairs.py"),
    ("ref", "data.reference", None, "tools/score_reference.py"),  # a manifest that does not say: its kind's tool
    ("dref", "data.dref", "tools/import_dref.py", "tools/import_dref.py"),
])
def test_a_shard_set_of_format_version_2_is_refused_in_one_line(root, folder, option, created_by, maker):
    """A set of an older format is never misread: one line naming the manifest, its version and the tool
    that re-makes it, before any shard is opened."""
    assert FORMAT_VERSION == 3 and Manifest.read(root / folder).format_version == 3  # what the tools write

    def make_it_version_2(manifest):
        manifest["format_version"] = 2
        if created_by is not None:
            manifest["info"]["created_by"] = created_by
    edit_manifest(root / folder, make_it_version_2)
    with pytest.raises(ShardError) as error:
        check_training_inputs(root / "pairs", root / "ref", root / "dref", vocab_size=100, log=lambda line: None)
    assert str(error.value) == (f"{option}={root / folder}: {root / folder / 'manifest.json'}: shard format version 2, "
                                f"but this mpo_dist reads version 3 only; re-make the set with {maker}")


@pytest.mark.unit
def test_dotdot_shard_name(root):
    edit_manifest(root / "pairs", lambda m: m["shards"][0].update(name="../../victim.tar"))
    refused(root, "pairs/manifest.json: shard name '../../victim.tar' is not a plain file name")


# ------------------------------------------------------------------------------ values


@pytest.mark.unit
def test_token_id_outside_the_vocabulary_missing_field_and_count(root):
    def damage(index, key, meta, arrays):
        if index == 1:
            arrays["chosen_ids"][2] = 100
        return key, meta, arrays

    rewrite(root / "pairs" / "shard-000002.tar", "pairs", damage)

    def drop_field(index, key, meta, arrays):
        if index == 0:
            del meta["chosen_logp"]
        if index == 4:
            meta["chosen_tokens"] += 1
        return key, meta, arrays

    rewrite(root / "ref" / "shard-000001.tar", "ref_logps", drop_field)
    message = refused(root, "pairs/shard-000002.tar: sample 's002-0001': array 'chosen_ids' holds token id 100 "
                            "outside the vocabulary of 100 tokens",
                      "ref/shard-000001.tar: sample 's001-0000': field 'chosen_logp' is missing",
                      "ref/shard-000001.tar: sample 's001-0004': field 'chosen_tokens' is")
    assert "found 3 problem(s)" in message
    refused(root, "outside the vocabulary of 100 tokens", vocab_size=1000)  # the tokenizer's 100 still bound the ids
    refused(root, "outside the vocabulary of 50 tokens", vocab_size=50)  # a smaller model's bound them


@pytest.mark.unit
def test_token_ids_outside_the_vocabulary_are_counted_in_one_line(root):
    """Shards of another tokenizer hold such ids in nearly every sample: one line counts them and names
    the first (a line per sample would bury the cause, and any other problem, under hundreds)."""
    from mpo_dist.data.shards import ShardCursor

    def samples_outside(folder: str) -> int:  # those holding an id >= 20
        manifest = Manifest.read(root / folder)
        return sum(any(int(ids.max()) >= 20 for ids in arrays.values())
                   for shard in manifest.shards
                   for _, _, arrays in ShardCursor(root / folder / shard.name, manifest.kind, shard.num_samples))

    count = samples_outside("pairs") + samples_outside("dref")
    assert count > 20
    message = refused(root, f"found {count} problem(s)", vocab_size=20)
    [line] = message.splitlines()[1:]
    assert line.strip().startswith(f"{count} samples hold token ids outside the vocabulary, the first: "
                                   f"{root / 'pairs' / 'shard-000000.tar'}: sample 's000-0000': array "), line
    assert "outside the vocabulary of 20 tokens; were they tokenized with another tokenizer" in line


@pytest.mark.unit
def test_dref_keys_follow_the_pairs_and_logp_ref_is_finite(root):
    def damage(index, key, meta, arrays):
        if index == 3:
            meta["logp_ref"] = math.inf
        if index == 5:
            key = "s001-0002-s9"
        return key, meta, arrays

    rewrite(root / "dref" / "shard-000001.tar", "dref", damage)
    refused(root, "dref/shard-000001.tar: sample 's001-0001-s1': field 'logp_ref' is inf (not finite)",
            "dref/shard-000001.tar: sample 5 has key 's001-0002-s9', expected 's001-0002-s1'")


@pytest.mark.unit
def test_problems_are_capped(root):
    rewrite(root / "ref" / "shard-000001.tar", "ref_logps",
            lambda i, key, meta, arrays: (key, {**meta, "chosen_logp": math.nan}, arrays))
    message = refused(root, "found 6 problem(s)", "... and 4 more", max_problems=2)
    assert message.count("field 'chosen_logp' is nan") == 2


@pytest.mark.dist
def test_every_rank_fails_when_one_rank_finds_a_problem(root):
    import torch.multiprocessing as mp

    rewrite(root / "ref" / "shard-000001.tar", "ref_logps",
            lambda i, key, meta, arrays: (key, {**meta, "chosen_logp": math.nan}, arrays))
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank_main, args=(2, free_port(), str(root), results), nprocs=2)
    assert results[0] == "InputError: pre-flight shard check failed on another rank (its message lists the problems)"
    assert results[1].startswith("ShardError: pre-flight shard check found 6 problem(s) (rank 1 of 2)")
    assert "ref/shard-000001.tar: sample 's001-0000': field 'chosen_logp' is nan" in results[1]


def _rank_main(rank: int, world_size: int, port: int, root: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        check(Path(root), rank=rank, world_size=world_size)
        results[rank] = "passed"
    except InputError as error:
        results[rank] = f"{type(error).__name__}: {error}"
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ provenance


def manifests(root: Path):
    return (Manifest.read(root / "pairs"), root / "pairs", Manifest.read(root / "ref"), root / "ref",
            Manifest.read(root / "dref"), root / "dref")


@pytest.mark.unit
def test_reference_and_dref_made_from_other_pairs_are_refused(root):
    edit_manifest(root / "ref", lambda m: m["info"].update(pairs_fingerprint=manifest_fingerprint(root / "pairs")))
    check_provenance(*manifests(root), model_dtype="float32")  # both made from these pairs
    make_pairs(root / "pairs", SIZES, seed=1)  # re-prepared: same keys and counts, other tokens
    with pytest.raises(InputError) as error:
        check_provenance(*manifests(root), model_dtype="float32")
    message = str(error.value)
    assert f"data.reference {root / 'ref'} was made from other pairs than data.pairs {root / 'pairs'}" in message
    assert "re-run tools/score_reference.py" in message
    edit_manifest(root / "ref", lambda m: m["info"].pop("pairs_fingerprint"))
    with pytest.raises(InputError, match=r"data\.dref .* was made from other pairs .* tools/sample_reference\.py"):
        check_provenance(*manifests(root), model_dtype="float32")


@pytest.mark.unit
def test_the_job_file_of_an_unfinished_job_is_not_provenance(root):
    """A tool's job file describes a job under way; only a manifest says what a finished set was made from."""
    (root / "ref" / ".job.json").write_text(json.dumps({"pairs": "sha256:older"}))
    check_provenance(Manifest.read(root / "pairs"), root / "pairs", Manifest.read(root / "ref"), root / "ref")


@pytest.mark.unit
def test_reference_dtype_other_than_model_dtype_warns_or_refuses(root):
    edit_manifest(root / "ref", lambda m: m["info"].update(model={"dtype": "float32"}))
    lines = []
    check_provenance(*manifests(root), model_dtype="bfloat16", log=lines.append)
    assert len(lines) == 2 and lines[0].startswith(f"WARNING: data.reference {root / 'ref'} was made with the "
                                                   "reference model in float32, but model.dtype=bfloat16")
    with pytest.raises(InputError, match="re-run tools/score_reference.py --dtype bfloat16 or set model.dtype=float32"):
        check_provenance(*manifests(root), model_dtype="bfloat16", on_dtype_mismatch="error")
    lines.clear()
    check_provenance(*manifests(root), model_dtype="float32", log=lines.append)
    assert lines == []


@pytest.mark.unit
def test_real_tool_output_records_its_provenance_and_passes(toy_inputs):
    pairs_fingerprint = manifest_fingerprint(toy_inputs["pairs"])
    for folder in ("reference", "dref"):
        info = Manifest.read(toy_inputs[folder]).info
        assert info["pairs_fingerprint"] == pairs_fingerprint
        assert info["model"]["dtype"] == "float32"
        assert info["model"]["tokenizer_hash"] == Manifest.read(toy_inputs["pairs"]).tokenizer_hash
    report = check_training_inputs(toy_inputs["pairs"], toy_inputs["reference"], toy_inputs["dref"],
                                   vocab_size=None, model_dtype="float32", log=QUIET)
    assert report.pairs == Manifest.read(toy_inputs["pairs"]).num_samples
