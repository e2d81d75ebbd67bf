"""tools/prepare_pairs.py and mpo_dist.producers.prepare: preference records -> pairs shards (the pairs
data contract); also every tool's --help.

Runs on the real assets in ../shared/data (HH-RLHF harmless test split, GPT-2 and stories260K
tokenizers) and on small synthetic files; every expected value is computed here independently.
The tools are run as commands, the way users run them.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SUBPROCESS_ENV
from mpo_dist.producers.prepare import REPORT_NAME, STATS_DIR, PrepareOptions, prepare_pairs
from mpo_dist.data.shards import MANIFEST_NAME, Manifest, ShardCursor, shard_name
from mpo_dist.tokenizer import load_tokenizer, tokenizer_fingerprint

ASSISTANT = "\n\nAssistant:"
GPT2_EOS_TEXT = "<|endoftext|>"
PER_SHARD = 300  # pairs.jsonl (2307 records) -> 8 shards
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ---------------------------------------------------------------------------- helpers


def prepare(input_path, tokenizer_dir, out, **options) -> dict:
    return prepare_pairs(input_path, tokenizer_dir, out, PrepareOptions(**options), log=lambda message: None)


def run_prepare_pairs(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "prepare_pairs.py"), *map(str, args)],
                          env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)


def read_samples(out: Path) -> list[tuple[str, str, dict, dict]]:
    """(shard name, key, meta, arrays) of every sample the manifest lists, in order; the cursor also
    checks that each tar holds exactly the manifest's count."""
    manifest = Manifest.read(out, "pairs")
    samples = []
    for shard in manifest.shards:
        cursor = ShardCursor(out / shard.name, "pairs", shard.num_samples)
        samples += [(shard.name, key, meta, arrays) for key, meta, arrays in cursor]
        cursor.close()
    return samples


def read_report(out: Path) -> dict:
    return json.loads((out / REPORT_NAME).read_text())


def dropped(out: Path) -> list[tuple[str, str]]:
    return [(entry["where"], entry["reason"]) for entry in read_report(out)["dropped_records"]]


def read_lines(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, record) of every non-blank line of a JSONL file, plain or gzip."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [(number, json.loads(line)) for number, line in enumerate(handle, 1) if line.strip()]


def write_jsonl(path: Path, records: list) -> Path:
    """Dicts are dumped as JSON; strings are written verbatim as lines."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Shard tars and temp files anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix == ".tar" or ".tmp-" in p.name)


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def truncated(prefix: list[int], body: list[int], chosen: list[int], rejected: list[int], eos: int,
              max_prompt_length: int, max_length: int) -> tuple[list[int], list[int], list[int]]:
    """The truncation policy, restated: the prompt keeps its special-token prefix and its end; the
    responses (ending with EOS) keep their start."""
    prompt = prefix + body
    if len(prompt) > max_prompt_length:
        prompt = prefix + body[len(body) - (max_prompt_length - len(prefix)):]
    room = max_length - len(prompt)
    return prompt, (chosen + [eos])[:room], (rejected + [eos])[:room]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gpt2_dir(shared_data) -> Path:
    return shared_data("gpt2-tokenizer")


@pytest.fixture(scope="module")
def stories_dir(shared_data) -> Path:
    return shared_data("stories260K")


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_tokenizer(gpt2_dir)


@pytest.fixture(scope="module")
def pairs_jsonl(shared_data) -> Path:
    return shared_data("hh-rlhf-harmless-test", "pairs.jsonl")


@pytest.fixture(scope="module")
def hh_gz(shared_data) -> Path:
    return shared_data("hh-rlhf-harmless-test", "test.jsonl.gz")


@pytest.fixture(scope="module")
def pairs_records(pairs_jsonl) -> list[tuple[int, dict]]:
    records = read_lines(pairs_jsonl)
    assert len(records) == 2307
    return records


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory, pairs_jsonl, gpt2_dir) -> tuple[Path, dict]:
    """pairs.jsonl prepared once, in this process, with the CLI's defaults and PER_SHARD."""
    out = tmp_path_factory.mktemp("pairs") / "out"
    return out, prepare(pairs_jsonl, gpt2_dir, out, samples_per_shard=PER_SHARD)


@pytest.fixture(scope="module")
def pairs_samples(pairs_run):
    return read_samples(pairs_run[0])


@pytest.fixture(scope="module")
def subset_jsonl(tmp_path_factory, pairs_records) -> Path:
    """The first 200 records of pairs.jsonl (line 87 among them has an empty response)."""
    return write_jsonl(tmp_path_factory.mktemp("subset") / "subset.jsonl", [r for _, r in pairs_records[:200]])


@pytest.fixture(scope="module")
def template_tokenizer_dir(tmp_path_factory, gpt2_dir) -> Path:
    """The GPT-2 tokenizer saved to another folder with a simple chat template."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("gpt2-chat")
    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return directory


# ---------------------------------------------------------------------------- 1. real data: counts, report, contents


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


# ---------------------------------------------------------------------------- 2. truncation


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


# ---------------------------------------------------------------------------- 3, 4. malformed records, labels


BAD_LINES = [
    {"prompt": "Q1", "chosen": " yes", "rejected": " no"},                     # 1 kept (record 0)
    "",                                                                        # 2 blank: not a record
    "{not json",                                                               # 3
    {"prompt": "Q", "chosen": " a"},                                           # 4
    {"prompt": "Q", "chosen": 5, "rejected": " b"},                            # 5
    {"prompt": "Q", "chosen": " a", "rejected": " b", "label": 1.5},           # 6
    {"prompt": "Q", "chosen": "  \n", "rejected": " b"},                       # 7
    {"prompt": "Q", "chosen": " same", "rejected": " same"},                   # 8
    "   ",                                                                     # 9 blank
    {"prompt": "", "chosen": " a", "rejected": " b"},                          # 10
    "[1, 2]",                                                                  # 11
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": " a", "rejected": " b"},  # 12
    {"prompt": "Q", "chosen": " a", "rejected": " b", "label": -0.1},          # 13
    {"prompt": 3, "chosen": " a", "rejected": " b"},                           # 14
    {"prompt": "Q", "chosen": " a", "rejected": " b", "label": True},          # 15
    {"prompt": "Q16", "chosen": " up", "rejected": " down", "label": 0.25},    # 16 kept (record 13)
]
# line -> (reason, words the reason must contain)
BAD_EXPECTED = {
    3: ("malformed", ["not valid JSON"]),
    4: ("malformed", ["missing", "'rejected'"]),
    5: ("malformed", ["'chosen'", "string", "int"]),
    6: ("malformed", ["'label'", "1.5"]),
    7: ("empty_response", []),
    8: ("identical_responses", []),
    10: ("empty_prompt", []),
    11: ("malformed", ["JSON object", "list"]),
    12: ("malformed", ["--chat-template"]),
    13: ("malformed", ["'label'", "-0.1"]),
    14: ("malformed", ["'prompt'"]),
    15: ("malformed", ["'label'", "True"]),
}


@pytest.fixture
def bad_jsonl(tmp_path) -> Path:
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    path.write_text(path.read_text()[:-1])  # the last line has no newline
    return path


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


# ---------------------------------------------------------------------------- 5. Parquet


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


# ---------------------------------------------------------------------------- 6. several processes


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


# ---------------------------------------------------------------------------- 7. resume, foreign folders


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


# ---------------------------------------------------------------------------- 8. argument errors


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


TOOLS = sorted(path.name for path in (REPO / "tools").glob("*.py"))


def test_every_tool_help_shows_its_defaults():
    assert "prepare_pairs.py" in TOOLS and len(TOOLS) >= 8
    jobs = {tool: subprocess.Popen([sys.executable, str(REPO / "tools" / tool), "--help"], env=SUBPROCESS_ENV, cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tool in TOOLS}
    helps = {}
    for tool, job in jobs.items():
        helps[tool], err = job.communicate(timeout=300)
        assert job.returncode == 0, (tool, err[-3000:])
        assert "(default: " in helps[tool], tool
    flat = {tool: " ".join(text.split()) for tool, text in helps.items()}  # argparse wraps lines
    assert "--max-length MAX_LENGTH max prompt + response tokens (default: 1024)" in flat["prepare_pairs.py"]
    assert "(default: 512, or half of a smaller --max-length)" in flat["prepare_pairs.py"]
    assert "(default: None)" not in flat["prepare_pairs.py"]
    for tool in ("prepare_pairs.py", "score_reference.py", "sample_reference.py"):  # the tools that compute
        assert "--threads THREADS CPU threads per process" in flat[tool] and "(default: 0)" in flat[tool], tool


# ---------------------------------------------------------------------------- 9. chat template


HH_DIALOGUE = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."


def test_chat_template_renders_hh_and_message_prompts(tmp_path, template_tokenizer_dir, gpt2):
    tokenizer = load_tokenizer(template_tokenizer_dir)
    assert tokenizer.chat_template == TEMPLATE
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": HH_DIALOGUE + ASSISTANT + " Why did the chicken cross the road?", "rejected": HH_DIALOGUE + ASSISTANT + " No."},
    ])
    out = tmp_path / "hh-out"
    prepare(hh, template_tokenizer_dir, out, chat_template=True)
    [(_, _, meta, arrays)] = read_samples(out)
    assert meta["prompt"] == HH_DIALOGUE + ASSISTANT
    prompt = decode(tokenizer, arrays["prompt_ids"])
    assert prompt == "<|user|>Hi there\n<|assistant|>Hello! How can I help?\n<|user|>Tell me a joke.\n<|assistant|>"
    assert prompt.count("<|user|>") == 2 and prompt.endswith("<|assistant|>")
    assert decode(tokenizer, arrays["chosen_ids"]) == " Why did the chicken cross the road?" + GPT2_EOS_TEXT
    assert decode(tokenizer, arrays["rejected_ids"]) == " No." + GPT2_EOS_TEXT
    manifest = Manifest.read(out, "pairs")
    assert manifest.tokenizer_hash == tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(gpt2)

    messages = write_jsonl(tmp_path / "messages.jsonl", [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "chosen": " Hello", "rejected": " Go"},
        {"prompt": "Plain question?", "chosen": " yes", "rejected": " no"},
    ])
    out = tmp_path / "messages-out"
    prepare(messages, template_tokenizer_dir, out, chat_template=True)
    prompts = [decode(tokenizer, arrays["prompt_ids"]) for _, _, _, arrays in read_samples(out)]
    assert prompts == ["<|system|>Be brief.\n<|user|>Hi\n<|assistant|>", "<|user|>Plain question?\n<|assistant|>"]


def test_chat_template_flag_without_a_template_is_an_error(tmp_path, gpt2_dir, gpt2):
    assert gpt2.chat_template is None
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_DIALOGUE + ASSISTANT + " A", "rejected": HH_DIALOGUE + ASSISTANT + " B"}])
    with pytest.raises(ValueError, match="--chat-template"):
        prepare(hh, gpt2_dir, tmp_path / "out", chat_template=True)
    assert leftovers(tmp_path / "out") == []
    assert prepare(hh, gpt2_dir, tmp_path / "out")["kept"] == 1  # the failed run did not claim --out


# ---------------------------------------------------------------------------- 10. tokenizer fingerprint


def test_tokenizer_fingerprint(tmp_path, gpt2_dir, stories_dir, gpt2, template_tokenizer_dir):
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(gpt2) == tokenizer_fingerprint(load_tokenizer(gpt2_dir))
    copy = tmp_path / "copy"
    AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True).save_pretrained(str(copy))
    assert tokenizer_fingerprint(load_tokenizer(copy)) == tokenizer_fingerprint(gpt2)
    stories = load_tokenizer(stories_dir)
    assert tokenizer_fingerprint(stories) == tokenizer_fingerprint(load_tokenizer(stories_dir))
    assert tokenizer_fingerprint(stories) != tokenizer_fingerprint(gpt2)
    assert tokenizer_fingerprint(load_tokenizer(template_tokenizer_dir)) != tokenizer_fingerprint(gpt2)
    assert tokenizer_fingerprint(gpt2).startswith("sha256:")


# ---------------------------------------------------------------------------- tool errors (issue 11, point 7)

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
