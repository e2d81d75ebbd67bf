"""Helpers and fixtures of the pairs-preparation tests (test_prepare*.py, test_tokenizer.py): the real
HH-RLHF files and tokenizers from SHARED_DATA, pairs.jsonl prepared once per session, a file of
malformed records with the reason each line must be dropped for, and readers of what prepare wrote.

Registered as a plugin by conftest.py; tests import the plain names with `from prepare_support import ...`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from unittest import mock

import pytest

from mpo_dist.data.shards import Manifest, ShardCursor
from mpo_dist.producers import prepare as prepare_module
from mpo_dist.producers.prepare import REPORT_NAME, PrepareOptions, prepare_pairs
from mpo_dist.tokenizer import load_tokenizer
from support import SHARED_DATA

ASSISTANT = "\n\nAssistant:"
GPT2_EOS_TEXT = "<|endoftext|>"
PER_SHARD = 300  # pairs.jsonl (2307 records) -> 8 shards


_SHARED_TOKENIZERS: dict[Path, object] = {}


def load_shared_tokenizer(path):
    """load_tokenizer, once per session for the read-only tokenizers of SHARED_DATA: half a second each
    time, which dozens of small prepare runs would spend again and again. Other folders (the tests'
    own, missing or broken ones) are loaded every time."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(SHARED_DATA.resolve()):
        return load_tokenizer(path)
    if resolved not in _SHARED_TOKENIZERS:
        _SHARED_TOKENIZERS[resolved] = load_tokenizer(path)
    return _SHARED_TOKENIZERS[resolved]


def prepare(input_path, tokenizer_dir, out, **options) -> dict:
    """prepare_pairs in this process, quietly, with PrepareOptions(**options); returns its summary."""
    with mock.patch.object(prepare_module, "load_tokenizer", load_shared_tokenizer):
        return prepare_pairs(input_path, tokenizer_dir, out, PrepareOptions(**options), log=lambda message: None)


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


# ---------------------------------------------------------------------------- a file of malformed records

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
    """BAD_LINES as a JSONL file whose last line has no newline."""
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    path.write_text(path.read_text()[:-1])
    return path


# ---------------------------------------------------------------------------- the real assets

@pytest.fixture(scope="session")
def gpt2_dir(shared_data) -> Path:
    return shared_data("gpt2-tokenizer")


@pytest.fixture(scope="session")
def stories_dir(shared_data) -> Path:
    return shared_data("stories260K")


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    return load_shared_tokenizer(gpt2_dir)


@pytest.fixture(scope="session")
def pairs_jsonl(shared_data) -> Path:
    return shared_data("hh-rlhf-harmless-test", "pairs.jsonl")


@pytest.fixture(scope="session")
def hh_gz(shared_data) -> Path:
    return shared_data("hh-rlhf-harmless-test", "test.jsonl.gz")


@pytest.fixture(scope="session")
def pairs_records(pairs_jsonl) -> list[tuple[int, dict]]:
    records = read_lines(pairs_jsonl)
    assert len(records) == 2307
    return records


@pytest.fixture(scope="session")
def pairs_run(tmp_path_factory, pairs_jsonl, gpt2_dir) -> tuple[Path, dict]:
    """pairs.jsonl prepared once, in this process, with the CLI's defaults and PER_SHARD: (folder, summary)."""
    out = tmp_path_factory.mktemp("pairs") / "out"
    return out, prepare(pairs_jsonl, gpt2_dir, out, samples_per_shard=PER_SHARD)


@pytest.fixture(scope="session")
def subset_jsonl(tmp_path_factory, pairs_records) -> Path:
    """The first 200 records of pairs.jsonl (line 87 among them has an empty response)."""
    return write_jsonl(tmp_path_factory.mktemp("subset") / "subset.jsonl", [r for _, r in pairs_records[:200]])
