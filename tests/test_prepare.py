"""mpo_dist.producers.prepare in this process: preference records -> pairs shards (the pairs data
contract). Counts, report and token ids on the real HH-RLHF files (SHARED_DATA), truncation, Parquet,
reruns and foreign folders, argument errors; every expected value is computed here independently.
Malformed records: test_prepare_records.py; the command line and torchrun: test_prepare_cli.py."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from mpo_dist.data.shards import MANIFEST_NAME, Manifest, shard_name
from mpo_dist.producers.prepare import STATS_DIR
from mpo_dist.tokenizer import load_tokenizer, tokenizer_fingerprint
from prepare_support import (ASSISTANT, GPT2_EOS_TEXT, PER_SHARD, decode, dropped, encode, prepare, read_lines,
                             read_report, read_samples, tree, write_jsonl)

pytestmark = pytest.mark.unit


def truncated(prefix: list[int], body: list[int], chosen: list[int], rejected: list[int], eos: int,
              max_prompt_length: int, max_length: int) -> tuple[list[int], list[int], list[int]]:
    """The truncation policy, restated: the prompt keeps its special-token prefix and its end; the
    responses (ending with EOS) keep their start."""
    prompt = prefix + body
    if len(prompt) > max_prompt_length:
        prompt = prefix + body[len(body) - (max_prompt_length - len(prefix)):]
    room = max_length - len(prompt)
    return prompt, (chosen + [eos])[:room], (rejected + [eos])[:room]


# ---------------------------------------------------------------------------- real data: counts, report, contents


@pytest.fixture(scope="module")
def pairs_samples(pairs_run):
    return read_samples(pairs_run[0])


def test_pairs_jsonl_counts_report_and_token_ids(pairs_run, pairs_samples, pairs_records, gpt2):
    out, summary = pairs_run
    # Independently: pairs.jsonl has no malformed records, only responses that are blank.
    expected_drops = [(f"line {n}", "empty_response") for n, r in pairs_records
                      if not r["chosen"].strip() or not r["rejected"].strip()]
    assert len(expected_drops) == 4
    kept_records = [(n, r) for n, r in pairs_records if (f"line {n}", "empty_response") not in expected_drops]

    manifest = Manifest.read(out, "pairs")
    report = read_report(out)
    assert manifest.kind == "pairs" and manifest.tokenizer_hash == tokenizer_fingerprint(gpt2)
    assert [s.name for s in manifest.shards] == [shard_name(i) for i in range(math.ceil(2307 / PER_SHARD))]
    assert manifest.num_samples == sum(s.num_samples for s in manifest.shards) == len(pairs_samples) == len(kept_records)
    assert summary["kept"] == report["kept"] == manifest.num_samples == 2303
    assert summary["records"] == report["records"] == len(pairs_records)
    assert report["kept"] + len(report["dropped_records"]) == report["records"]
    assert dropped(out) == expected_drops
    assert summary["dropped"] == report["dropped"] == {"empty_response": 4}
    assert json.loads((out / MANIFEST_NAME).read_text())["num_samples"] == 2303

    # Keys are record indexes; shard i holds records [i*N, (i+1)*N); texts and token ids are the record's.
    prompts = encode(gpt2, [r["prompt"] for _, r in kept_records])
    chosens = encode(gpt2, [r["chosen"] for _, r in kept_records])
    rejecteds = encode(gpt2, [r["rejected"] for _, r in kept_records])
    lengths = {s.name: list(s.lengths) for s in manifest.shards}
    truncated_prompts = 0
    for position, ((shard, key, meta, arrays), (line, record)) in enumerate(zip(pairs_samples, kept_records)):
        assert key == f"{line - 1:09d}" and shard == shard_name((line - 1) // PER_SHARD)
        assert meta == {**record, "label": None, "where": f"line {line}"}
        prompt, chosen, rejected = truncated([], prompts[position], chosens[position], rejecteds[position],
                                             gpt2.eos_token_id, 512, 1024)
        assert arrays["prompt_ids"].dtype == np.int32
        assert arrays["prompt_ids"].tolist() == prompt
        assert arrays["chosen_ids"].tolist() == chosen
        assert arrays["rejected_ids"].tolist() == rejected
        assert lengths[shard].pop(0) == len(prompt) + max(len(chosen), len(rejected))
        truncated_prompts += len(prompts[position]) > 512
    assert truncated_prompts == summary["truncated_prompt"] == 27
    assert summary["truncated_response"] == 0

    # Decoding an untruncated sample gives back its texts, responses ending with EOS.
    untruncated = [s for s in pairs_samples if len(s[3]["prompt_ids"]) < 512]
    for _, _, meta, arrays in untruncated[:3] + untruncated[-2:]:
        assert decode(gpt2, arrays["prompt_ids"]) == meta["prompt"]
        both = np.concatenate([arrays["prompt_ids"], arrays["chosen_ids"]])
        assert decode(gpt2, both) == meta["prompt"] + meta["chosen"] + GPT2_EOS_TEXT
        both = np.concatenate([arrays["prompt_ids"], arrays["rejected_ids"]])
        assert decode(gpt2, both) == meta["prompt"] + meta["rejected"] + GPT2_EOS_TEXT


def test_hh_dialogues_gz_malformed_lines_and_same_pairs_as_pairs_jsonl(tmp_path, hh_gz, gpt2_dir, pairs_samples):
    # Independently: the records whose dialogues differ before their last assistant turn.
    lines = read_lines(hh_gz)
    assert len(lines) == 2312
    malformed, empty = [], []
    for number, record in lines:
        chosen, rejected = record["chosen"], record["rejected"]
        cut_c, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
        if chosen[:cut_c] != rejected[:cut_r]:
            malformed.append(f"line {number}")
        elif not chosen[cut_c + len(ASSISTANT):].strip() or not rejected[cut_r + len(ASSISTANT):].strip():
            empty.append(f"line {number}")
    assert len(malformed) == 5

    out = tmp_path / "out"
    summary = prepare(hh_gz, gpt2_dir, out, samples_per_shard=1000)
    report = read_report(out)
    manifest = Manifest.read(out, "pairs")
    assert manifest.info["input"]["format"] == "hh"
    assert report["records"] == 2312
    assert manifest.num_samples == sum(s.num_samples for s in manifest.shards) == report["kept"] == summary["kept"]
    assert report["kept"] + len(report["dropped_records"]) == 2312
    drops = dropped(out)
    assert [where for where, reason in drops if reason.startswith("malformed")] == malformed
    assert all("differ before their last assistant turn" in reason for _, reason in drops if reason.startswith("malformed"))
    assert [where for where, reason in drops if reason == "empty_response"] == empty
    assert len(drops) == len(malformed) + len(empty)
    assert summary["dropped"] == {"malformed": 5, "empty_response": len(empty)}

    # The dialogues cut at the last assistant turn are pairs.jsonl: same texts, same token ids.
    samples = read_samples(out)
    assert len(samples) == len(pairs_samples)
    for (_, _, meta, arrays), (_, _, pairs_meta, pairs_arrays) in zip(samples, pairs_samples):
        assert {k: meta[k] for k in ("prompt", "chosen", "rejected")} == {k: pairs_meta[k] for k in ("prompt", "chosen", "rejected")}
        assert meta["prompt"].endswith(ASSISTANT)
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert np.array_equal(arrays[name], pairs_arrays[name])


# ---------------------------------------------------------------------------- truncation


def test_truncation_keeps_prompt_end_and_response_start(tmp_path, subset_jsonl, gpt2_dir, gpt2):
    out = tmp_path / "out"
    summary = prepare(subset_jsonl, gpt2_dir, out, samples_per_shard=64, max_prompt_length=24, max_length=40)
    samples = read_samples(out)
    records = {f"line {n}": r for n, r in read_lines(subset_jsonl)}
    assert dropped(out) == [("line 87", "empty_response")]
    assert len(samples) == 199
    expected_truncated_prompt = expected_truncated_response = 0
    for _, _, meta, arrays in samples:
        record = records[meta["where"]]
        body, chosen, rejected = encode(gpt2, [record["prompt"], record["chosen"], record["rejected"]])
        prompt_ids, chosen_ids, rejected_ids = (arrays[n].tolist() for n in ("prompt_ids", "chosen_ids", "rejected_ids"))
        assert len(prompt_ids) <= 24
        assert len(prompt_ids) + len(chosen_ids) <= 40 and len(prompt_ids) + len(rejected_ids) <= 40
        assert prompt_ids == body[-24:]  # the prompt keeps its end
        assert decode(gpt2, prompt_ids).endswith(ASSISTANT)
        assert (prompt_ids, chosen_ids, rejected_ids) == truncated([], body, chosen, rejected, gpt2.eos_token_id, 24, 40)
        expected_truncated_prompt += len(body) > 24
        expected_truncated_response += max(len(chosen), len(rejected)) + 1 > 40 - len(prompt_ids)
    assert summary["truncated_prompt"] == expected_truncated_prompt > 0
    assert summary["truncated_response"] == expected_truncated_response > 0


def test_left_truncation_keeps_bos(tmp_path, subset_jsonl, stories_dir):
    stories = load_tokenizer(stories_dir)
    prefix = stories("", add_special_tokens=True)["input_ids"]
    assert prefix == [1] and stories.eos_token_id == 2
    out = tmp_path / "out"
    summary = prepare(subset_jsonl, stories_dir, out, samples_per_shard=64, max_prompt_length=16, max_length=32)
    records = {f"line {n}": r for n, r in read_lines(subset_jsonl)}
    samples = read_samples(out)
    assert len(samples) == 199
    for _, _, meta, arrays in samples:
        record = records[meta["where"]]
        body, chosen, rejected = encode(stories, [record["prompt"], record["chosen"], record["rejected"]])
        prompt_ids = arrays["prompt_ids"].tolist()
        assert prompt_ids[0] == 1 and 1 not in prompt_ids[1:]
        assert prompt_ids == [1] + body[-15:]
        expected = truncated([1], body, chosen, rejected, 2, 16, 32)
        assert (prompt_ids, arrays["chosen_ids"].tolist(), arrays["rejected_ids"].tolist()) == expected
    assert summary["truncated_prompt"] == sum(len(encode(stories, [r["prompt"]])[0]) + 1 > 16
                                              for w, r in records.items() if w != "line 87") > 0


def test_truncation_drop_reports_too_long(tmp_path, subset_jsonl, gpt2_dir, gpt2):
    out = tmp_path / "out"
    summary = prepare(subset_jsonl, gpt2_dir, out, samples_per_shard=64, max_prompt_length=24, max_length=40,
                      truncation="drop")
    expected_too_long, fits = [], {}
    for number, record in read_lines(subset_jsonl):
        if number == 87:
            continue
        body, chosen, rejected = encode(gpt2, [record["prompt"], record["chosen"], record["rejected"]])
        if len(body) > 24 or len(body) + max(len(chosen), len(rejected)) + 1 > 40:
            expected_too_long.append(f"line {number}")
        else:
            fits[f"line {number}"] = (body, chosen + [gpt2.eos_token_id], rejected + [gpt2.eos_token_id])
    drops = dropped(out)
    assert drops == sorted([("line 87", "empty_response")] + [(w, "too_long") for w in expected_too_long],
                           key=lambda d: int(d[0].split()[1]))
    assert summary["dropped"] == {"empty_response": 1, "too_long": len(expected_too_long)}
    assert summary["truncated_prompt"] == summary["truncated_response"] == 0
    samples = read_samples(out)
    assert [meta["where"] for _, _, meta, _ in samples] == list(fits)
    for _, _, meta, arrays in samples:
        assert tuple(arrays[n].tolist() for n in ("prompt_ids", "chosen_ids", "rejected_ids")) == fits[meta["where"]]


# ---------------------------------------------------------------------------- Parquet


def test_parquet_gives_the_same_samples_as_jsonl(tmp_path, pairs_records, gpt2_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [dict(r, label=None) for _, r in pairs_records[:120]]
    records[3]["label"] = 0.25
    records[7]["rejected"] = None  # malformed in both formats
    jsonl = write_jsonl(tmp_path / "p.jsonl", records)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet, row_group_size=50)

    prepare(jsonl, gpt2_dir, tmp_path / "from-jsonl", samples_per_shard=50)
    prepare(parquet, gpt2_dir, tmp_path / "from-parquet", samples_per_shard=50)
    a, b = Manifest.read(tmp_path / "from-jsonl"), Manifest.read(tmp_path / "from-parquet")
    assert (a.info["input"]["format"], b.info["input"]["format"]) == ("jsonl", "parquet-prompt")
    assert a.shards == b.shards and a.tokenizer_hash == b.tokenizer_hash and a.num_samples == 118
    drops = dropped(tmp_path / "from-parquet")
    assert [(w.replace("row", "line"), r) for w, r in drops] == dropped(tmp_path / "from-jsonl")
    assert [w for w, _ in drops] == ["row 8", "row 87"]  # row 87: pairs.jsonl's blank response
    assert "'rejected' must be a string" in drops[0][1] and drops[1][1] == "empty_response"
    from_jsonl, from_parquet = read_samples(tmp_path / "from-jsonl"), read_samples(tmp_path / "from-parquet")
    assert len(from_jsonl) == len(from_parquet) == 118
    for (shard_a, key_a, meta_a, arrays_a), (shard_b, key_b, meta_b, arrays_b) in zip(from_jsonl, from_parquet):
        assert (shard_a, key_a) == (shard_b, key_b)
        assert meta_b.pop("where") == meta_a.pop("where").replace("line", "row")
        assert meta_a == meta_b
        assert arrays_a.keys() == arrays_b.keys()
        for name in arrays_a:
            assert np.array_equal(arrays_a[name], arrays_b[name]) and arrays_a[name].dtype == arrays_b[name].dtype
    assert from_parquet[3][2]["label"] == 0.25


# ---------------------------------------------------------------------------- reruns, foreign folders


def test_rerun_rewrites_a_missing_shard_identically_and_skips_the_rest(tmp_path, pairs_run, pairs_jsonl, gpt2_dir):
    out = tmp_path / "out"
    shutil.copytree(pairs_run[0], out)
    before = tree(out)
    for path in out.glob("*.tar"):
        os.utime(path, ns=(0, 0))  # a shard written again gets a new mtime
    (out / shard_name(1)).unlink()
    (out / STATS_DIR / f"{shard_name(1)}.json").unlink()

    summary = prepare(pairs_jsonl, gpt2_dir, out, samples_per_shard=PER_SHARD)
    assert summary == pairs_run[1]
    assert tree(out) == before
    rewritten = {path.name for path in out.glob("*.tar") if path.stat().st_mtime_ns != 0}
    assert rewritten == {shard_name(1)}

    with pytest.raises(ValueError) as error:
        prepare(pairs_jsonl, gpt2_dir, out, samples_per_shard=PER_SHARD, max_length=2048)
    assert "--out" in str(error.value) and "other settings (options differ" in str(error.value)
    assert tree(out) == before


def test_foreign_output_folder_is_refused_and_an_empty_one_is_used(tmp_path, bad_jsonl, gpt2_dir):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError) as error:
        prepare(bad_jsonl, gpt2_dir, foreign)
    assert "--out" in str(error.value) and "not empty" in str(error.value)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare(bad_jsonl, gpt2_dir, empty)["kept"] == 2


# ---------------------------------------------------------------------------- argument errors


def test_argument_errors_name_the_option_or_file(tmp_path, bad_jsonl, gpt2_dir):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as error:
        prepare(tmp_path / "nope.jsonl", gpt2_dir, out)
    assert "--input" in str(error.value) and "nope.jsonl" in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        prepare(bad_jsonl, tmp_path / "no-tokenizer", out)
    assert "tokenizer" in str(error.value) and "no-tokenizer" in str(error.value)
    (tmp_path / "not-a-tokenizer").mkdir()
    with pytest.raises(ValueError, match="not-a-tokenizer: cannot load a tokenizer"):
        prepare(bad_jsonl, tmp_path / "not-a-tokenizer", out)
    for max_prompt_length in (64, 65):
        with pytest.raises(ValueError) as error:
            prepare(bad_jsonl, gpt2_dir, out, max_prompt_length=max_prompt_length, max_length=64)
        assert "--max-prompt-length" in str(error.value) and "--max-length" in str(error.value)
    with pytest.raises(ValueError, match="--samples-per-shard"):
        prepare(bad_jsonl, gpt2_dir, out, samples_per_shard=0)
    assert not out.exists()  # nothing is created before the arguments are checked


def test_no_sequence_length_warning_for_texts_that_are_truncated(tmp_path, gpt2_dir):
    """Texts over the tokenizer's model_max_length are truncated by prepare itself, so transformers'
    warning that they would not fit the model only misleads."""
    import logging

    from transformers import AutoTokenizer

    short = tmp_path / "gpt2-64"
    AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True, model_max_length=64).save_pretrained(str(short))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # transformers' loggers do not propagate to pytest's capture
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        load_tokenizer(short)(["word " * 100], verbose=True)
        assert any("Token indices sequence length" in r.getMessage() for r in records)  # what this test would see
        records.clear()
        path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 100, "chosen": " a", "rejected": " b"}])
        assert prepare(path, short, tmp_path / "out", max_length=128)["truncated_prompt"] == 1
    finally:
        logger.removeHandler(handler)
    assert not any("Token indices sequence length" in r.getMessage() for r in records)
