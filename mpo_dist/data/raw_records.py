"""Reading raw preference records from JSONL (plain or gzip), the HH-RLHF dialogue format, and Parquet.

Each record comes out as `(position, RawPair)` or `(position, reason)` when it is malformed, so the
prepare step can count and report every record it does not keep, by line (JSONL) or row (Parquet).
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

from mpo_dist.errors import InputError

FORMATS = ("auto", "jsonl", "hh", "parquet")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


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


def detect_format(path: str | os.PathLike) -> str:
    """Guess jsonl / hh / parquet from the file name and, for JSON lines, the first record's keys."""
    path = Path(path)
    if path.suffix == ".parquet":
        return "parquet"
    with _open_text(path) as handle:
        for line in handle:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}: first record is not JSON ({error}); pass --format") from error
                if isinstance(first, dict) and ("prompt" in first or isinstance(first.get("chosen"), list)):
                    return "jsonl"  # a prompt, or whole conversations (which carry their prompt)
                if isinstance(first, dict) and {"chosen", "rejected"} <= first.keys():
                    return "hh"
                raise InputError(
                    f"{path}: cannot tell the format from the first record's keys "
                    f"{sorted(first) if isinstance(first, dict) else type(first).__name__}; "
                    "expected prompt/chosen/rejected (jsonl) or chosen/rejected dialogues (hh)"
                )
    raise InputError(f"{path}: no records")


def _open_text(path: Path):
    """For telling the format from the first record only: a byte that is not UTF-8 is replaced here
    and reported, with its line, as a malformed record by `parse_record`."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if gzipped:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


class ProgressFile:
    """Wraps a binary file to count the (compressed) bytes consumed, for progress and ETA."""

    def __init__(self, path: Path):
        self.handle = open(path, "rb")
        self.total = os.fstat(self.handle.fileno()).st_size

    @property
    def done(self) -> int:
        return self.handle.tell()


def iter_raw_records(path: str | os.PathLike, fmt: str, progress: ProgressFile | None = None) -> Iterator[tuple[str, Any]]:
    """Yield `(where, raw)` for every record without parsing it ('line N' or 'row N').

    Parsing is left to `parse_record`, so a process that keeps only some records parses only those.
    JSON lines are yielded as bytes: a line that is not UTF-8 is one malformed record (decoded by
    `parse_record`), not the end of the file. Blank JSONL lines are not records and are skipped.
    """
    path = Path(path)
    if fmt.startswith("parquet"):
        yield from _iter_parquet_rows(path)
        return
    raw = progress.handle if progress is not None else open(path, "rb")
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
                raise InputError(f"{path}: unreadable at line {line_no} ({error})") from error
            if not line:
                return
            if line.strip():
                yield f"line {line_no}", line


def _iter_parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise InputError(f"{path}: not a readable Parquet file ({error})") from error
    row = 0
    for batch in table.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield f"row {row}", record


def resolve_format(path: str | os.PathLike, fmt: str) -> str:
    """'auto' -> the detected format; Parquet with a 'prompt' column reads as jsonl records."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except Exception as error:
            raise InputError(f"{path}: not a readable Parquet file ({error})") from error
        return "parquet-prompt" if "prompt" in names else "parquet-hh"
    return fmt


def parse_record(raw: Any, fmt: str) -> RawPair | str:
    """A raw JSON line or Parquet row -> RawPair, or the reason it is malformed."""
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
        if isinstance(raw.get("chosen"), list) or isinstance(raw.get("rejected"), list):  # conversations, any format
            prompt, chosen, rejected = split_conversations(raw.get("prompt"), raw.get("chosen"), raw.get("rejected"))
            return RawPair(prompt, chosen, rejected, _label(raw), conversational=True)
        if fmt in ("hh", "parquet-hh"):
            prompt, chosen, rejected = split_hh_dialogues(_text(raw, "chosen"), _text(raw, "rejected"))
        else:
            prompt = raw.get("prompt")
            if not (isinstance(prompt, str) or _is_messages(prompt)):
                raise MalformedRecord("'prompt' must be a string or a list of {role, content} messages")
            chosen, rejected = _text(raw, "chosen"), _text(raw, "rejected")
        return RawPair(prompt, chosen, rejected, _label(raw))
    except MalformedRecord as error:
        return f"malformed: {error}"


def _text(record: dict, key: str) -> str:
    if key not in record:
        raise MalformedRecord(f"missing key '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise MalformedRecord(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _label(record: dict) -> float | None:
    label = record.get("label")
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not (0.0 <= label <= 1.0) or math.isnan(label):
        raise MalformedRecord(f"'label' must be a probability in [0, 1], got {label!r}")
    return float(label)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def split_conversations(prompt: Any, chosen: Any, rejected: Any) -> tuple[list[dict[str, str]], str, str]:
    """Two conversations (message lists, as UltraFeedback-binarized and most current preference sets
    store them) -> (their shared messages, the chosen and the rejected final assistant contents).

    A separate `prompt` (text or messages) is put before a conversation that does not already start
    with it. Every earlier turn stays in the prompt; after it, each side must hold exactly one
    assistant turn, so that a record never trains on a response that is not the last turn."""
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not _is_messages(value):
            raise MalformedRecord(f"'{key}' must be a list of {{role, content}} messages like the other side, "
                                  f"got {type(value).__name__}")
    if prompt is not None:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif not _is_messages(prompt):
            raise MalformedRecord("'prompt' must be a string or a list of {role, content} messages")
        chosen, rejected = ([*prompt, *side] if side[:len(prompt)] != prompt else side for side in (chosen, rejected))
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise MalformedRecord("chosen and rejected conversations share no prompt (their first messages differ)")
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        rest = side[shared:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            roles = ", ".join(m["role"] for m in rest) or "nothing"
            raise MalformedRecord(f"after the {shared} messages both conversations share, '{key}' holds {roles}; "
                                  "expected one assistant turn")
    if chosen[shared - 1]["role"] == "assistant":
        raise MalformedRecord("the shared messages end with an assistant turn: nothing asks for the responses")
    return [dict(m) for m in chosen[:shared]], chosen[shared]["content"], rejected[shared]["content"]


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
