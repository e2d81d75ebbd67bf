"""mpo_dist.producers.prepare on records it must drop: each malformed, empty or identical record is
reported with its line and reason, --strict stops at the first one, soft labels are kept."""

from __future__ import annotations

import gzip
import json

import pytest

from mpo_dist.data.shards import MANIFEST_NAME, Manifest, shard_name
from mpo_dist.producers.prepare import REPORT_NAME, STATS_DIR
from prepare_support import BAD_EXPECTED, dropped, leftovers, prepare, read_report, read_samples, write_jsonl

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------- malformed records, labels


def test_malformed_records_reported_with_line_and_reason(tmp_path, bad_jsonl, gpt2_dir):
    out = tmp_path / "out"
    summary = prepare(bad_jsonl, gpt2_dir, out, samples_per_shard=4)
    report = read_report(out)
    assert report["records"] == 14  # blank lines are not records
    drops = dropped(out)
    assert [int(where.split()[1]) for where, _ in drops] == sorted(BAD_EXPECTED)
    for where, reason in drops:
        expected_reason, words = BAD_EXPECTED[int(where.split()[1])]
        assert reason.split(":")[0] == expected_reason, (where, reason)
        for word in words:
            assert word in reason, (where, reason)
    assert summary["dropped"] == {"malformed": 9, "empty_response": 1, "identical_responses": 1, "empty_prompt": 1}
    # Records 0-3 | 4-7 | 8-11 | 12-13: the two middle shards keep nothing and are not listed or written.
    manifest = Manifest.read(out, "pairs")
    assert [(s.name, s.num_samples) for s in manifest.shards] == [(shard_name(0), 1), (shard_name(3), 1)]
    assert sorted(p.name for p in out.glob("*.tar")) == [shard_name(0), shard_name(3)]
    samples = read_samples(out)
    assert [(key, meta["where"], meta["prompt"], meta["label"]) for _, key, meta, _ in samples] == [
        ("000000000", "line 1", "Q1", None), ("000000013", "line 16", "Q16", 0.25)]


def test_strict_raises_on_first_bad_record_and_leaves_no_shard(tmp_path, bad_jsonl, gpt2_dir):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        prepare(bad_jsonl, gpt2_dir, out, samples_per_shard=100, strict=True)
    message = str(error.value)
    assert f"{bad_jsonl}: line 3:" in message and "not valid JSON" in message
    assert leftovers(out) == []
    assert not (out / MANIFEST_NAME).exists() and not (out / REPORT_NAME).exists()


def test_blank_response_found_by_strict_after_blank_lines(tmp_path, gpt2_dir):
    path = write_jsonl(tmp_path / "x.jsonl", ["", {"prompt": "Q", "chosen": " a", "rejected": " b"}, "",
                                               {"prompt": "Q", "chosen": " a", "rejected": ""}])
    with pytest.raises(ValueError, match=r"x\.jsonl: line 4: empty_response"):
        prepare(path, gpt2_dir, tmp_path / "out", strict=True)
    assert leftovers(tmp_path / "out") == []


def test_soft_labels_are_stored(tmp_path, gpt2_dir):
    labels = [0.7, "absent", 0, 1, None, 0.5]
    records = []
    for i, label in enumerate(labels):
        record = {"prompt": f"Question {i}?", "chosen": f" answer {i}", "rejected": f" other {i}"}
        if label != "absent":
            record["label"] = label
        records.append(record)
    out = tmp_path / "out"
    prepare(write_jsonl(tmp_path / "labels.jsonl", records), gpt2_dir, out, samples_per_shard=4)
    stored = [meta["label"] for _, _, meta, _ in read_samples(out)]
    assert stored == [0.7, None, 0.0, 1.0, None, 0.5]
    assert all(label is None or isinstance(label, float) for label in stored)


def test_empty_prompt_dropped_with_bos_tokenizer(tmp_path, stories_dir):
    """An empty prompt is empty whether or not the tokenizer adds BOS (it must not become a BOS-only prompt)."""
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "", "chosen": " a", "rejected": " b"},
                                              {"prompt": "Once", "chosen": " upon", "rejected": " a time"}])
    out = tmp_path / "out"
    prepare(path, stories_dir, out)
    assert dropped(out) == [("line 1", "empty_prompt")]
    assert [meta["where"] for _, _, meta, _ in read_samples(out)] == ["line 2"]


def test_blank_prompt_is_empty(tmp_path, gpt2_dir):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": " \n ", "chosen": " a", "rejected": " b"},
                                              {"prompt": "Q", "chosen": " a", "rejected": " b"}])
    prepare(path, gpt2_dir, tmp_path / "out")
    assert dropped(tmp_path / "out") == [("line 1", "empty_prompt")]


def test_non_strict_rerun_completes_what_strict_stopped(tmp_path, gpt2_dir):
    good = [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(6)]
    path = write_jsonl(tmp_path / "x.jsonl", good[:4] + [{"prompt": "Q", "chosen": " a", "rejected": ""}] + good[4:])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"line 5: empty_response"):
        prepare(path, gpt2_dir, out, samples_per_shard=2, strict=True)
    assert (out / shard_name(0)).exists()  # shards before the bad record were finished
    summary = prepare(path, gpt2_dir, out, samples_per_shard=2)
    assert summary["kept"] == 6 and dropped(out) == [("line 5", "empty_response")]


# ---------------------------------------------------------------------------- a malformed shard, a claim, invalid UTF-8


GOOD = [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(4)]


def test_a_shard_of_only_malformed_records_is_reported_not_a_crash(tmp_path, gpt2_dir):
    path = write_jsonl(tmp_path / "x.jsonl", GOOD[:2] + ["{not json", {"prompt": "Q"}] + GOOD[2:])
    out = tmp_path / "out"
    summary = prepare(path, gpt2_dir, out, samples_per_shard=2)  # shard 1 holds lines 3 and 4 only
    assert summary["kept"] == 4 and summary["dropped"] == {"malformed": 2}
    assert [where for where, _ in dropped(out)] == ["line 3", "line 4"]
    assert [s.name for s in Manifest.read(out).shards] == [shard_name(0), shard_name(2)]


def test_strict_stops_at_a_malformed_shards_first_record_and_a_fixed_rerun_starts_fresh(tmp_path, gpt2_dir):
    path = write_jsonl(tmp_path / "x.jsonl", ["{not json", {"prompt": "Q"}] + GOOD)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"x\.jsonl: line 1: malformed: not valid JSON"):
        prepare(path, gpt2_dir, out, samples_per_shard=2, strict=True, format="jsonl")
    assert not out.exists() or sorted(p.name for p in out.rglob("*")) == []  # no claim, no .prepare/ left behind
    write_jsonl(path, GOOD)  # the input fixed (another size): the rerun is not refused
    assert prepare(path, gpt2_dir, out, samples_per_shard=2, strict=True)["kept"] == 4


def test_a_claim_without_output_does_not_block_a_rerun_with_other_settings(tmp_path, gpt2_dir):
    from mpo_dist.producers.job import JOB_FILE

    out = tmp_path / "out"
    (out / STATS_DIR).mkdir(parents=True)
    (out / JOB_FILE).write_text(json.dumps({"options": "older run that wrote nothing"}))
    assert prepare(write_jsonl(tmp_path / "x.jsonl", GOOD), gpt2_dir, out)["kept"] == 4


@pytest.mark.parametrize("compress", [False, True])
def test_an_invalid_utf8_byte_is_one_malformed_record_with_its_line(tmp_path, gpt2_dir, compress):
    lines = [json.dumps(record).encode() for record in GOOD]
    lines[2] = lines[2].replace(b"Q2", b"Q\xff2")
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / ("x.jsonl.gz" if compress else "x.jsonl")
    path.write_bytes(gzip.compress(data) if compress else data)
    out = tmp_path / "out"
    summary = prepare(path, gpt2_dir, out, format="jsonl" if compress else "auto")
    assert summary["kept"] == 3
    assert dropped(out) == [("line 3", "malformed: not valid UTF-8 (byte 0xff at column 14)")]
    with pytest.raises(ValueError, match=r"x\.jsonl(\.gz)?: line 3: malformed: not valid UTF-8"):
        prepare(path, gpt2_dir, tmp_path / "strict", strict=True, format="jsonl")


def test_an_invalid_utf8_byte_in_the_first_record_still_tells_the_format(tmp_path, gpt2_dir):
    path = tmp_path / "x.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode().replace(b"Q0", b"Q\xfe") + b"\n" + json.dumps(GOOD[1]).encode() + b"\n")
    out = tmp_path / "out"
    assert prepare(path, gpt2_dir, out)["kept"] == 1
    assert dropped(out)[0][0] == "line 1" and "not valid UTF-8" in dropped(out)[0][1]
