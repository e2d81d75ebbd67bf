"""Reading raw preference records: JSON lines (plain or gzip), the HH-RLHF dialogue format, Parquet, and
a Hugging Face `datasets` folder (`save_to_disk`; needs the optional `datasets` extra).

`RecordSource` is one input: its format, the names of its columns (`--columns`), the split of a
DatasetDict folder, and how far it has been read (for progress). Each record comes out as
`(position, raw)`; `parse_record` makes a `RawPair` of it, or the reason it is malformed, so the
prepare step can count and report every record it does not keep, by line (JSON lines) or row
(Parquet, datasets).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mpo_dist.errors import InputError, MissingInputError

FORMATS = ("auto", "jsonl", "hh", "parquet", "datasets")
FIELDS = ("prompt", "chosen", "rejected", "label")  # the project's names for a record's fields (--columns maps to them)
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
DATASETS_EXTRA = "pip install 'mpo_dist[datasets]'"
_ROWS_PER_BATCH = 4096


@dataclass
class RawPair:
    prompt: str | list[dict[str, str]]  # text, or chat messages [{"role", "content"}, ...]
    chosen: str
    rejected: str
    label: float | None = None  # probability that `chosen` is preferred; None means 1.0
    # True when the record held whole conversations: `prompt` is their shared messages and `chosen` /
    # `rejected` the contents of each final assistant turn, which the chat template must render.
    conversational: bool = False


class MalformedRecord(ValueError):
    """One record that cannot be used: reported with its line or row, never raised out of this module."""


def parse_columns(text: str) -> dict[str, str]:
    """--columns 'prompt=question,chosen=pos,rejected=neg' -> {field: the input's column name}."""
    columns: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        field, equals, name = (piece.strip() for piece in item.partition("="))
        if not equals or not name or field not in FIELDS:
            raise InputError(f"--columns {text!r}: each item must be FIELD=COLUMN with FIELD one of "
                             f"{', '.join(FIELDS)}; got {item!r}")
        if field in columns:
            raise InputError(f"--columns {text!r}: {field} is mapped twice")
        if name in columns.values():
            raise InputError(f"--columns {text!r}: column {name!r} is mapped to two fields")
        columns[field] = name
    return columns


def column_names(columns: dict[str, str] | None) -> dict[str, str]:
    """Each field's column in the input: the `--columns` mapping, else the field's own name."""
    columns = columns or {}
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise InputError(f"--columns names {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    return {field: columns.get(field, field) for field in FIELDS}


def is_datasets_folder(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json)."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


class RecordSource:
    """One input of preference records, read once from start to end; `done` / `total` say how far
    (bytes of the file as stored for JSON lines, rows for Parquet and datasets folders)."""

    def __init__(self, path: str | os.PathLike, fmt: str = "auto", *, columns: dict[str, str] | None = None,
                 split: str | None = None):
        if fmt not in FORMATS:
            raise InputError(f"--format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
        self.path, self.columns, self.names = Path(path), dict(columns or {}), column_names(columns)
        if not self.path.exists():
            raise MissingInputError(f"--input {self.path} does not exist")
        self.split, self.done, self.total = split, 0, 0
        self._dataset = None
        if self.path.is_dir():
            if fmt not in ("auto", "datasets"):
                raise InputError(f"--input {self.path} is a folder; --format {fmt} reads a file (a folder must be a "
                                 "datasets folder, --format datasets or auto)")
            self.format = self._open_datasets_folder()
        else:
            if fmt == "datasets":
                raise InputError(f"--input {self.path} is a file; --format datasets reads a folder written by "
                                 "save_to_disk")
            if split is not None:
                raise InputError(f"--split {split}: --input {self.path} is a file; --split picks a split of a "
                                 "datasets folder")
            self.format = self._resolve_file_format(fmt)

    @property
    def kind(self) -> str:
        """jsonl, hh, parquet or datasets."""
        return self.format.split("-")[0]

    def describe(self) -> dict[str, Any]:
        """What the pairs are made from (recorded in the manifest; a resumed run must match it)."""
        info: dict[str, Any] = {"path": str(self.path.resolve()), "format": self.format}
        if self._dataset is None:
            info["size"] = self.path.stat().st_size
        else:
            # Like a file's size: what changes when the data does (save_to_disk writes a new fingerprint
            # for data transformed in any way), without reading it all.
            files = [Path(entry["filename"]) for entry in self._dataset.cache_files]
            state = files[0].parent / "state.json" if files else None
            fingerprint = json.loads(state.read_text()).get("_fingerprint") if state and state.is_file() else None
            info.update(split=self.split, rows=len(self._dataset), size=sum(f.stat().st_size for f in files),
                        fingerprint=fingerprint)
        if self.columns:
            info["columns"] = self.columns
        return info

    def records(self) -> Iterator[tuple[str, Any]]:
        """Yield `(where, raw)` for every record without parsing it ('line N' or 'row N').

        Parsing is left to `parse`, so a process that keeps only some records parses only those.
        JSON lines are yielded as bytes: a line that is not UTF-8 is one malformed record (decoded by
        `parse_record`), not the end of the file. Blank JSONL lines are not records and are skipped.
        Parquet and datasets rows are read a batch at a time, never the whole input at once.
        """
        if self.kind == "parquet":
            yield from self._rows(self._parquet_file().iter_batches(batch_size=_ROWS_PER_BATCH))
        elif self.kind == "datasets":
            # Arrow batches of the memory-mapped dataset, converted to Python one batch at a time.
            yield from self._rows(self._dataset.with_format("arrow").iter(batch_size=_ROWS_PER_BATCH))
        else:
            yield from self._lines()

    def parse(self, raw: Any) -> RawPair | str:
        return parse_record(raw, self.format, self.names)

    def _rows(self, batches) -> Iterator[tuple[str, dict]]:
        self.done = 0
        for batch in batches:
            for record in batch.to_pylist():
                self.done += 1
                yield f"row {self.done}", record

    def _lines(self) -> Iterator[tuple[str, bytes]]:
        raw = open(self.path, "rb")
        self.total = os.fstat(raw.fileno()).st_size
        head = raw.read(2)
        raw.seek(0)
        binary = gzip.GzipFile(fileobj=raw, mode="rb") if head == b"\x1f\x8b" else raw
        with raw, binary:
            line_no = 0
            while True:
                line_no += 1
                try:
                    line = binary.readline()
                except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as error:
                    raise InputError(f"{self.path}: unreadable at line {line_no} ({error})") from error
                self.done = raw.tell()  # compressed bytes consumed, for progress and ETA
                if not line:
                    return
                if line.strip():
                    yield f"line {line_no}", line

    def _resolve_file_format(self, fmt: str) -> str:
        """'auto' -> the detected format; a table with a prompt column reads as jsonl records."""
        if fmt == "auto":
            fmt = "parquet" if self.path.suffix == ".parquet" else detect_format(self.path, self.names)
        if fmt != "parquet":
            if self.columns:
                first = _first_record(self.path)
                missing = [f"{field}={name}" for field, name in self.columns.items()
                           if not (isinstance(first, dict) and name in first)]
                if missing:
                    raise InputError(f"--columns {', '.join(missing)}: the first record of --input {self.path} has "
                                     f"no such key (its keys: {_keys(first)})")
            return fmt
        schema = self._parquet_file().schema_arrow.names
        self.total = self._parquet_file().metadata.num_rows
        return self._table_format("parquet", schema)

    def _parquet_file(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except Exception as error:  # pyarrow raises several unrelated types for a bad file
            raise InputError(f"{self.path}: not a readable Parquet file ({error})") from error

    def _open_datasets_folder(self) -> str:
        if not is_datasets_folder(self.path):
            raise InputError(f"--input {self.path} is a folder but not a datasets folder (no state.json or "
                             "dataset_dict.json, as Dataset.save_to_disk writes); pass a file or such a folder")
        self._dataset, self.split = load_datasets_folder(self.path, self.split)
        self.total = len(self._dataset)
        return self._table_format("datasets", self._dataset.column_names)

    def _table_format(self, kind: str, names: list[str]) -> str:
        """`kind`-prompt when the table has a prompt column, else `kind`-hh (dialogues, or conversations
        that carry their prompt); a column it must have is an error naming the column and the file."""
        needed = {field: self.names[field] for field in ("chosen", "rejected")} | self.columns
        missing = [(field, name) for field, name in needed.items() if name not in names]
        if missing:
            field, name = missing[0]
            fix = "name it with --columns" if field not in self.columns else "correct --columns"
            raise InputError(f"--input {self.path} has no column {name!r} (for {field}; its columns: "
                             f"{', '.join(names)}); {fix} {field}=COLUMN")
        return f"{kind}-prompt" if self.names["prompt"] in names else f"{kind}-hh"


def load_datasets_folder(path: Path, split: str | None) -> tuple[Any, str | None]:
    """(the dataset, its split) of a `save_to_disk` folder, memory-mapped rather than read into
    memory: the folder's one dataset (split None), or `split` of a DatasetDict folder (its only split
    when it has one). Needs the optional `datasets` package."""
    try:
        import datasets
    except ImportError as error:
        raise InputError(f"--input {path} is a Hugging Face datasets folder; reading it needs the datasets "
                         f"package: {DATASETS_EXTRA}") from error
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the tool shows its own progress; datasets' bars would break its line
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets and pyarrow raise several unrelated types for a damaged folder
        raise InputError(f"--input {path}: not a readable datasets folder ({type(error).__name__}: {error})") from error
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise InputError(f"--split {split}: --input {path} holds one dataset, not splits; leave --split out")
        return loaded, None
    splits = list(loaded)
    if split is None:
        if len(splits) != 1:
            raise InputError(f"--input {path} holds the splits {', '.join(splits)}; choose one with --split")
        split = splits[0]
    if split not in loaded:
        raise InputError(f"--split {split}: --input {path} holds the splits {', '.join(splits)}")
    return loaded[split], split


def detect_format(path: str | os.PathLike, names: dict[str, str] | None = None) -> str:
    """Guess jsonl / hh from the first record's keys (after the --columns mapping in `names`)."""
    path, names = Path(path), names or column_names(None)
    first = _first_record(path)
    if isinstance(first, dict) and (names["prompt"] in first or isinstance(first.get(names["chosen"]), list)):
        return "jsonl"  # a prompt, or whole conversations (which carry their prompt)
    if isinstance(first, dict) and {names["chosen"], names["rejected"]} <= first.keys():
        return "hh"
    raise InputError(
        f"{path}: cannot tell the format from the first record's keys ({_keys(first)}); expected "
        "prompt/chosen/rejected (jsonl) or chosen/rejected dialogues (hh), or name the columns with --columns"
    )


def _keys(record: Any) -> str:
    return ", ".join(sorted(record)) if isinstance(record, dict) else f"not an object but a {type(record).__name__}"


def _first_record(path: Path) -> Any:
    with _open_text(path) as handle:
        for line in handle:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}: first record is not JSON ({error}); pass --format") from error
    raise InputError(f"{path}: no records")


def _open_text(path: Path):
    """For telling the format from the first record only: a byte that is not UTF-8 is replaced here
    and reported, with its line, as a malformed record by `parse_record`."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if gzipped:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def parse_record(raw: Any, fmt: str, names: dict[str, str] | None = None) -> RawPair | str:
    """A raw JSON line or table row -> RawPair, or the reason it is malformed. `names`: each field's
    key in the record (`column_names`), so reasons name the input's own keys."""
    names = names or column_names(None)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"malformed: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            return f"malformed: not valid JSON ({error.msg})"
    try:
        if not isinstance(raw, dict):
            raise MalformedRecord(f"expected a JSON object, got {type(raw).__name__}")
        chosen, rejected = raw.get(names["chosen"]), raw.get(names["rejected"])
        if isinstance(chosen, list) or isinstance(rejected, list):  # conversations, any format
            prompt, chosen, rejected = split_conversations(raw.get(names["prompt"]), chosen, rejected, names)
            return RawPair(prompt, chosen, rejected, _label(raw, names["label"]), conversational=True)
        if fmt.endswith("hh"):
            prompt, chosen, rejected = split_hh_dialogues(_text(raw, names["chosen"]), _text(raw, names["rejected"]))
        else:
            prompt = raw.get(names["prompt"])
            if not isinstance(prompt, str):
                prompt = _messages(prompt)
                if prompt is None:
                    raise MalformedRecord(f"'{names['prompt']}' must be a string or a list of {{role, content}} messages")
            chosen, rejected = _text(raw, names["chosen"]), _text(raw, names["rejected"])
        return RawPair(prompt, chosen, rejected, _label(raw, names["label"]))
    except MalformedRecord as error:
        return f"malformed: {error}"


def _text(record: dict, key: str) -> str:
    if key not in record:
        raise MalformedRecord(f"missing key '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise MalformedRecord(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _label(record: dict, key: str = "label") -> float | None:
    label = record.get(key)
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not (0.0 <= label <= 1.0) or math.isnan(label):
        raise MalformedRecord(f"'{key}' must be a probability in [0, 1], got {label!r}")
    return float(label)


def _messages(value: Any) -> list[dict[str, Any]] | None:
    """`value` as {role, content} messages in one canonical form, or None when it is none: role and
    content first, other keys sorted, keys whose value is None left out (Arrow gives every message of
    a column the union of the keys, an absent one as None), so that the same record read from JSON
    lines, Parquet or a datasets folder gives the same messages, the same bytes and the same split."""
    if not (isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)):
        return None
    return [{"role": m["role"], "content": m["content"],
             **{key: m[key] for key in sorted(m) if key not in ("role", "content") and m[key] is not None}}
            for m in value]


def split_conversations(prompt: Any, chosen: Any, rejected: Any,
                        names: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], str, str]:
    """Two conversations (message lists, as UltraFeedback-binarized and most current preference sets
    store them) -> (their shared messages, the chosen and the rejected final assistant contents).

    A separate `prompt` (text or messages) goes before conversations that hold only the responses (no
    user turn; after their system messages). Conversations with user turns carry their prompt (as
    UltraFeedback's, whose `prompt` repeats the first user turn): it must then be among their turns,
    and is not put in a second time. Every earlier turn stays in the prompt; after it, each side must
    hold exactly one assistant turn, so that a record never trains on a response that is not the last
    turn. `names`: the input's keys for the fields, for the reasons."""
    name = (names or column_names(None)).__getitem__
    sides = []
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        messages = _messages(value)
        if messages is None:
            raise MalformedRecord(f"'{name(field)}' must be a list of {{role, content}} messages like the other side, "
                                  f"got {type(value).__name__}")
        sides.append(messages)
    if prompt is not None:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt)
        if messages is None:
            raise MalformedRecord(f"'{name('prompt')}' must be a string or a list of {{role, content}} messages")
        sides = [_with_prompt(side, messages, name("prompt")) for side in sides]
    chosen, rejected = sides
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise MalformedRecord("chosen and rejected conversations share no prompt (their first messages differ)")
    for field, side in (("chosen", chosen), ("rejected", rejected)):
        rest = side[shared:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            roles = ", ".join(m["role"] for m in rest) or "nothing"
            raise MalformedRecord(f"after the {shared} messages both conversations share, '{name(field)}' holds "
                                  f"{roles}; expected one assistant turn")
    if chosen[shared - 1]["role"] == "assistant":
        raise MalformedRecord("the shared messages end with an assistant turn: nothing asks for the responses")
    return chosen[:shared], chosen[shared]["content"], rejected[shared]["content"]


def _with_prompt(conversation: list[dict], prompt: list[dict], key: str) -> list[dict]:
    if not any(m["role"] == "user" for m in conversation):
        lead = next((i for i, m in enumerate(conversation) if m["role"] != "system"), len(conversation))
        return [*conversation[:lead], *prompt, *conversation[lead:]]
    if not any(conversation[i:i + len(prompt)] == prompt for i in range(len(conversation) - len(prompt))):
        raise MalformedRecord(f"'{key}' is not among the turns of the conversations, which hold their own user turns")
    return conversation


def split_hh_dialogues(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF dialogues at their last '\\n\\nAssistant:' into (prompt, chosen, rejected).

    The prompt keeps the trailing 'Assistant:'; the responses keep their leading space.
    """
    cut_chosen, cut_rejected = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_chosen < 0 or cut_rejected < 0:
        raise MalformedRecord("dialogue has no '\\n\\nAssistant:' turn")
    end_chosen, end_rejected = cut_chosen + len(HH_ASSISTANT), cut_rejected + len(HH_ASSISTANT)
    if chosen[:end_chosen] != rejected[:end_rejected]:
        raise MalformedRecord("chosen and rejected dialogues differ before their last assistant turn")
    return chosen[:end_chosen], chosen[end_chosen:], rejected[end_rejected:]


def hh_prompt_to_messages(prompt: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> chat messages (the last,
    empty assistant turn is left for the chat template's generation prompt)."""
    messages = []
    rest = prompt
    while rest:
        if rest.startswith(HH_HUMAN):
            role, rest = "user", rest[len(HH_HUMAN):]
        elif rest.startswith(HH_ASSISTANT):
            role, rest = "assistant", rest[len(HH_ASSISTANT):]
        else:
            raise MalformedRecord("dialogue does not start with '\\n\\nHuman:'")
        ends = [i for i in (rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)) if i >= 0]
        end = min(ends) if ends else len(rest)
        messages.append({"role": role, "content": rest[:end].strip()})
        rest = rest[end:]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages
