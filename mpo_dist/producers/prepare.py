"""Preference records -> tokenized pairs shards (the pairs data contract), on one or many processes.

Shard `i` holds the kept records among input records `[i*N, (i+1)*N)`, N = samples_per_shard, so
the output is the same whatever the number of processes: process `r` of `W` writes the shards with
`i % W == r`. Each shard is written atomically with a small stats file beside it (in `.prepare/`);
a rerun skips shards whose stats exist. The output folder is claimed, swept of stale temp files and
progress is reported by `producers.job` (the tools' one resumable-job mechanism). After a barrier,
rank 0 writes the manifest and the report.

Held-out split (`eval_fraction` F > 0): every record goes to `OUT/eval/` when a stable hash of its
prompt text falls below F (`split_side`), else to `OUT/train/`; each is a complete pairs shard set
(shards, manifest, report) whose manifest records the split under `info.split`. The side depends on
the prompt alone, never on the record's position, the shard size or the number of processes, and all
pairs of one prompt land on the same side, so no eval prompt is ever trained on. Input shard `i` gives
shard `i` of both sides (one of them may be empty and is then not listed); it is finished when both
stats files exist. Records that cannot be parsed have no prompt: they are reported on the train side.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mpo_dist.data.shards import Manifest, ShardInfo, ShardWriter, atomic_write_bytes, shard_name
from mpo_dist.data.raw_records import RawPair, RecordSource, hh_prompt_to_messages
from mpo_dist.distributed import barrier
from mpo_dist.errors import InputError
from mpo_dist.producers.job import Progress, release_output_dir, start_job, stderr_log
from mpo_dist.tokenizer import load_tokenizer, tokenizer_fingerprint

STATS_DIR = ".prepare"
REPORT_NAME = "prepare_report.json"
PROMPT_LENGTH_CAP = 512  # the default prompt limit, unless half of --max-length is less
SPLIT_SIDES = ("train", "eval")
# How a record's side is chosen (recorded in the manifests; change the version if the rule changes).
SPLIT_RULE = ("eval when int(sha256('mpo_dist.eval_split.v1\\0' + prompt)[:8 bytes], big-endian) / 2**64 < fraction; "
              "prompt: the record's prompt text before tokenization (chat messages as sorted-key JSON)")
_SPLIT_SALT = b"mpo_dist.eval_split.v1\0"


def split_key(prompt: str | list) -> str:
    """The text a record's side is decided by: its prompt (messages as canonical JSON)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def split_value(prompt: str | list) -> float:
    """A stable pseudo-uniform number in [0, 1) for a prompt (the same on every machine and run)."""
    digest = hashlib.sha256(_SPLIT_SALT + split_key(prompt).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_side(prompt: str | list, eval_fraction: float) -> str:
    """"eval" or "train": the held-out side of a record with this prompt."""
    return "eval" if split_value(prompt) < eval_fraction else "train"


def default_max_prompt_length(max_length: int) -> int:
    """The prompt limit when none is given: 512, or half of a smaller `max_length` (room for the response)."""
    return min(PROMPT_LENGTH_CAP, max_length // 2)


@dataclass
class PrepareOptions:
    samples_per_shard: int = 1000
    max_length: int = 1024
    max_prompt_length: int | None = None  # None: default_max_prompt_length(max_length)
    truncation: str = "truncate"  # "truncate": cut prompt (left) then responses (right); "drop": drop too-long records
    chat_template: bool = False
    append_eos: bool = True
    strict: bool = False
    format: str = "auto"
    eval_fraction: float = 0.0  # > 0: split by prompt hash into OUT/train and OUT/eval
    columns: dict[str, str] = field(default_factory=dict)  # field -> the input's column (--columns)
    split: str | None = None  # the split of a DatasetDict folder (--split)

    def __post_init__(self) -> None:
        if self.max_prompt_length is None:
            self.max_prompt_length = default_max_prompt_length(self.max_length)

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise InputError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.max_length < 2:
            raise InputError(f"--max-length must be >= 2 (a prompt token and a response token), got {self.max_length}")
        if not 1 <= self.max_prompt_length < self.max_length:
            raise InputError(
                f"--max-prompt-length ({self.max_prompt_length}) must be >= 1 and below --max-length "
                f"({self.max_length}) to leave room for the response"
            )
        if self.truncation not in ("truncate", "drop"):
            raise InputError(f"--truncation must be 'truncate' or 'drop', got {self.truncation!r}")
        if not (isinstance(self.eval_fraction, (int, float)) and 0 <= self.eval_fraction < 1):
            raise InputError(f"--eval-fraction must be >= 0 and < 1, got {self.eval_fraction}")

    def sides(self, out_dir: Path) -> list[tuple[str | None, Path]]:
        """(side, folder) of each output shard set: the folder itself, or its train/ and eval/ sub-folders."""
        if not self.eval_fraction:
            return [(None, out_dir)]
        return [(side, out_dir / side) for side in SPLIT_SIDES]


@dataclass
class ShardStats:
    index: int
    records: int
    kept: int
    dropped: list[list[str]]  # [where, reason]
    truncated_prompt: int
    truncated_response: int
    prompt_lengths: list[int] = field(default_factory=list)
    chosen_lengths: list[int] = field(default_factory=list)
    rejected_lengths: list[int] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        """Per-pair cost: prompt plus the longer response (what a padded batch pays)."""
        return [p + max(c, r) for p, c, r in zip(self.prompt_lengths, self.chosen_lengths, self.rejected_lengths)]


class PairTokenizer:
    """Tokenizes RawPairs with the truncation policy; returns a sample or a drop reason.

    A conversational pair (chosen / rejected were message lists) is always rendered by the chat
    template, with or without --chat-template: its prompt is the shared messages with the generation
    prompt, each response what the template adds for the final assistant turn (its end of turn
    included, no EOS after it). Its prompt tokens are the prompt's own (as generation sees them) and a
    prefix of the tokens of the whole rendered conversation, whose rest is the response; a template
    that renders the earlier turns otherwise once the final turn is added, or tokens that merge across
    the prompt's end, are reported per record instead of training on a wrong split."""

    def __init__(self, tokenizer, options: PrepareOptions, log: Callable[[str], None] = lambda message: None):
        self.tokenizer, self.options, self.log = tokenizer, options, log
        if options.chat_template and tokenizer.chat_template is None:
            raise InputError("--chat-template was given but the tokenizer has no chat template")
        # Special tokens the tokenizer puts before text (e.g. BOS); kept when a prompt is cut from the left.
        # A chat template writes its own (e.g. {{ bos_token }}).
        self.prefix = [] if options.chat_template else tokenizer("", add_special_tokens=True)["input_ids"]
        self.suffix = [tokenizer.eos_token_id] if options.append_eos and tokenizer.eos_token_id is not None else []
        self._said_template = False

    def render_conversations(self, where: str) -> None:
        """Called with the first conversational record of a shard: refuses a tokenizer without a chat
        template (no split of a conversation would be right), and says once that the template renders
        them when --chat-template was not given."""
        if self.tokenizer.chat_template is None:
            raise InputError(f"{where}: chosen/rejected are conversations (message lists), which need a chat "
                             "template, and the tokenizer in --tokenizer has none; use a tokenizer folder with one "
                             "(chat_template.jinja, or chat_template in tokenizer_config.json)")
        if not (self.options.chat_template or self._said_template):
            self._said_template = True
            self.log(f"prepare_pairs: conversations (chosen/rejected as message lists) are rendered with the "
                     f"tokenizer's chat template ({chat_template_hash(self.tokenizer)}); plain-text prompts are "
                     "not (--chat-template renders those too)")

    def __call__(self, pairs: list[RawPair]) -> list[dict | str]:
        if not pairs:  # every record of a shard malformed: the tokenizer fails on an empty batch
            return []
        texts = [self._texts(pair) for pair in pairs]
        usable = [text if isinstance(text, tuple) else ("", "", "") for text in texts]
        prompt_ids, chosen_ids, rejected_ids = (self._encode([text[i] for text in usable]) for i in range(3))
        results: list[dict | str] = []
        for pair, text, prompt, chosen, rejected in zip(pairs, texts, prompt_ids, chosen_ids, rejected_ids):
            if isinstance(text, str):
                results.append(text)
                continue
            if pair.conversational:  # chosen / rejected hold the whole conversations' tokens
                if chosen[:len(prompt)] != prompt or rejected[:len(prompt)] != prompt:
                    results.append("template_split: the rendered conversation's tokens do not start with the "
                                   "prompt's tokens (a token spans the prompt's end)")
                    continue
                chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
            results.append(self._finish(pair, prompt, chosen, rejected))
        return results

    def _texts(self, pair: RawPair) -> tuple[str, str, str] | str:
        """(prompt, chosen, rejected) texts to tokenize, or the reason there are none. For a conversation:
        the prompt as rendered with the generation prompt, then each whole conversation as rendered."""
        try:
            if not pair.conversational:
                prompt = self._prompt_text(pair)
                if prompt is None:
                    return "malformed: prompt is a list of messages; pass --chat-template"
                return prompt, pair.chosen, pair.rejected
            prompt = self._render(pair.prompt, add_generation_prompt=True)
            wholes = [self._render([*pair.prompt, {"role": "assistant", "content": content}])
                      for content in (pair.chosen, pair.rejected)]
        except TemplateRefusal as refusal:
            return f"template_error: the chat template refused the conversation ({refusal})"
        if not all(whole.startswith(prompt) for whole in wholes):
            return ("template_rewrites_turns: the chat template renders the earlier turns differently once the "
                    "final assistant turn is added, so no prompt/response split matches it")
        return prompt, *wholes

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as error:  # e.g. raise_exception('Conversation roles must alternate ...')
            raise TemplateRefusal(str(error)) from error

    def _prompt_text(self, pair: RawPair) -> str | None:
        if not self.options.chat_template:
            return pair.prompt if isinstance(pair.prompt, str) else None
        messages = pair.prompt if isinstance(pair.prompt, list) else None
        if messages is None:
            messages = hh_prompt_to_messages(pair.prompt) if pair.prompt.startswith("\n\nHuman:") else [
                {"role": "user", "content": pair.prompt}
            ]
        return self._render(messages, add_generation_prompt=True)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: no "sequence length is longer than the maximum" warning for texts that are truncated here.
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def _finish(self, pair: RawPair, prompt_body, chosen, rejected) -> dict | str:
        options = self.options
        prefix = [] if pair.conversational else self.prefix  # the template's rendering holds its own
        prompt = prefix + prompt_body
        # Blank text is empty whatever the tokenizer adds (a BOS alone is not a prompt).
        if not prompt_body or (isinstance(pair.prompt, str) and not pair.prompt.strip()):
            return "empty_prompt"
        if not pair.chosen.strip() or not pair.rejected.strip():
            return "empty_response"
        if not pair.conversational:  # a conversation's response ends with the template's end of turn
            chosen, rejected = chosen + self.suffix, rejected + self.suffix
        truncated_prompt = len(prompt) > options.max_prompt_length
        if truncated_prompt:
            keep = options.max_prompt_length - len(prefix)
            prompt = prefix + prompt_body[len(prompt_body) - keep :]
        room = options.max_length - len(prompt)
        truncated_response = max(len(chosen), len(rejected)) > room
        if (truncated_prompt or truncated_response) and options.truncation == "drop":
            return "too_long"
        chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            return "identical_responses"
        return {
            "meta": {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "label": pair.label},
            "arrays": {
                "prompt_ids": np.asarray(prompt, dtype=np.int32),
                "chosen_ids": np.asarray(chosen, dtype=np.int32),
                "rejected_ids": np.asarray(rejected, dtype=np.int32),
            },
            "truncated_prompt": truncated_prompt,
            "truncated_response": truncated_response,
        }


class TemplateRefusal(Exception):
    """The chat template raised for a record (e.g. roles that do not alternate): reported per record."""


def chat_template_hash(tokenizer) -> str | None:
    """A hash of the tokenizer's chat template (None without one), recorded in the manifest."""
    template = tokenizer.chat_template
    if template is None:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def prepare_pairs(
    input_path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: PrepareOptions,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] = stderr_log,
) -> dict | None:
    """Write this rank's shards; rank 0 then writes manifest and report and returns the summary.

    Callable in one process without a process group (rank 0 of 1) as well as under torchrun."""
    options.validate()
    input_path, out_dir = Path(input_path), Path(out_dir)
    source = RecordSource(input_path, options.format, columns=options.columns, split=options.split)
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer_hash = tokenizer_fingerprint(tokenizer)
    params = {
        # --strict decides whether to stop, not what a shard holds: a rerun may change it. The split is
        # recorded under "split" (only when there is one: an unsplit output is what it always was). What
        # the input is (its format, split and column names) is recorded under "input".
        "options": {key: value for key, value in asdict(options).items()
                    if key not in ("strict", "eval_fraction", "columns", "split")},
        "input": source.describe(),
        "tokenizer": {"path": str(Path(tokenizer_dir).resolve()), "hash": tokenizer_hash, "vocab_size": len(tokenizer),
                      "pad_token_id": tokenizer.pad_token_id},
    }
    if options.eval_fraction:
        params["split"] = {"fraction": float(options.eval_fraction), "rule": SPLIT_RULE}
    # Fails on a bad --chat-template before --out is claimed.
    tokenize = PairTokenizer(tokenizer, options, log if rank == 0 else lambda message: None)
    start_job("prepare_pairs", out_dir, params, rank=rank, log=log)
    # For the manifest only, not the claim: the tokenizer's hash covers the template already, and a folder
    # claimed before this entry existed (the same shards) must still resume.
    params["tokenizer"]["chat_template"] = chat_template_hash(tokenizer)
    try:
        num_records = _write_shards(source, out_dir, tokenize, rank, world_size, log)
    except BaseException:
        if world_size == 1:  # alone, a run that stopped before its first shard leaves no claim behind
            release_output_dir(out_dir)
        raise
    barrier()
    if rank != 0:
        return None
    if num_records == 0:
        release_output_dir(out_dir)
        raise InputError(f"--input {input_path} holds no records")
    num_shards = math.ceil(num_records / options.samples_per_shard)
    sides = options.sides(out_dir)
    if len(sides) == 1:
        summary = _finish(out_dir, num_shards, tokenizer_hash, params, log)
        _refuse_if_nothing_kept(input_path, [out_dir])
        return summary
    summaries = {}
    for side, folder in sides:
        side_params = {**params, "split": {**params["split"], "side": side, "held_out": side == "eval"}}
        summaries[side] = _finish(folder, num_shards, tokenizer_hash, side_params, log)
    _refuse_if_nothing_kept(input_path, [folder for _, folder in sides])
    total = {key: summaries["train"][key] + summaries["eval"][key] for key in ("records", "kept")}
    log(f"prepare_pairs: split {total['records']} records by prompt hash (--eval-fraction {options.eval_fraction}): "
        f"{summaries['train']['kept']} train pairs in {out_dir / 'train'}, {summaries['eval']['kept']} eval pairs in "
        f"{out_dir / 'eval'}")
    return {**total, "split": params["split"], **summaries}


def _write_shards(source: RecordSource, out_dir: Path, tokenize: PairTokenizer, rank: int, world_size: int,
                  log: Callable[[str], None]) -> int:
    """This rank's unfinished shards; returns the number of input records."""
    options = tokenize.options
    stats_dirs = [folder / STATS_DIR for _, folder in options.sides(out_dir)]
    for stats_dir in stats_dirs:
        stats_dir.mkdir(parents=True, exist_ok=True)
    per_shard = options.samples_per_shard
    progress = Progress("prepare_pairs", "records", log, enabled=rank == 0)
    pending: list[tuple[str, object]] = []
    num_records = 0
    for where, raw in source.records():
        shard = num_records // per_shard
        num_records += 1
        if shard % world_size == rank and not all((d / f"{shard_name(shard)}.json").exists() for d in stats_dirs):
            pending.append((where, raw))
            if len(pending) == per_shard:
                _write_shard(shard, pending, tokenize, source, out_dir)
                pending = []
        if progress.due():  # by input bytes (JSON lines) or rows (tables) read
            progress.update(num_records, fraction=source.done / source.total if source.total else None)
    if pending:
        _write_shard((num_records - 1) // per_shard, pending, tokenize, source, out_dir)
    progress.close(num_records)
    return num_records


def _write_shard(index: int, records, tokenize: PairTokenizer, source: RecordSource, out_dir: Path) -> None:
    options = tokenize.options
    first = index * options.samples_per_shard
    parsed = [(where, source.parse(raw)) for where, raw in records]
    conversation = next((where for where, pair in parsed if isinstance(pair, RawPair) and pair.conversational), None)
    if conversation is not None:
        tokenize.render_conversations(f"{source.path}: {conversation}")
    good = [(offset, where, pair) for offset, (where, pair) in enumerate(parsed) if isinstance(pair, RawPair)]
    results: dict[int, dict | str] = {offset: reason for offset, (_, reason) in enumerate(parsed) if isinstance(reason, str)}
    results.update(zip([offset for offset, _, _ in good], tokenize([pair for _, _, pair in good])))
    if options.strict:  # before any side is written: a strict stop leaves no shard of this index behind
        for offset, (where, _) in enumerate(parsed):
            if isinstance(results[offset], str):
                raise InputError(f"{source.path}: {where}: {results[offset]} (--strict stops at the first record not kept)")
    sides = options.sides(out_dir)
    # Unparsable records have no prompt: they are reported on the first side (train).
    side_of = [split_side(pair.prompt, options.eval_fraction) if isinstance(pair, RawPair) and options.eval_fraction
               else sides[0][0] for _, pair in parsed]
    for side, folder in sides:
        mine = [offset for offset in range(len(parsed)) if side_of[offset] == side]
        _write_side_shard(index, first, [(offset, parsed[offset][0], results[offset]) for offset in mine], folder)


def _write_side_shard(index: int, first: int, results: list[tuple[int, str, dict | str]], out_dir: Path) -> None:
    stats = ShardStats(index=index, records=len(results), kept=0, dropped=[], truncated_prompt=0, truncated_response=0)
    with ShardWriter(out_dir / shard_name(index), "pairs") as writer:
        for offset, where, result in results:
            if isinstance(result, str):
                stats.dropped.append([where, result])
                continue
            result["meta"]["where"] = where
            writer.write(f"{first + offset:09d}", result["meta"], result["arrays"])
            arrays = result["arrays"]
            stats.kept += 1
            stats.truncated_prompt += result["truncated_prompt"]
            stats.truncated_response += result["truncated_response"]
            stats.prompt_lengths.append(len(arrays["prompt_ids"]))
            stats.chosen_lengths.append(len(arrays["chosen_ids"]))
            stats.rejected_lengths.append(len(arrays["rejected_ids"]))
    if stats.kept == 0:
        (out_dir / shard_name(index)).unlink()  # a shard of nothing is not listed; its stats say why
    atomic_write_bytes(out_dir / STATS_DIR / f"{shard_name(index)}.json", json.dumps(asdict(stats)).encode())


def _finish(out_dir: Path, num_shards: int, tokenizer_hash: str, params: dict, log) -> dict:
    all_stats = []
    for index in range(num_shards):
        path = out_dir / STATS_DIR / f"{shard_name(index)}.json"
        if not path.exists():
            raise RuntimeError(f"{path} is missing after all ranks finished: a rank failed; rerun to complete")
        all_stats.append(ShardStats(**json.loads(path.read_text())))
    shards = [ShardInfo(shard_name(s.index), s.kept, s.lengths) for s in all_stats if s.kept]
    manifest = Manifest("pairs", tokenizer_hash, shards, info={"created_by": "tools/prepare_pairs.py", **params})
    manifest.write(out_dir)

    dropped = [entry for s in all_stats for entry in s.dropped]
    by_reason: dict[str, list[str]] = {}
    for where, reason in dropped:
        by_reason.setdefault(reason.split(":")[0], []).append(where)
    lengths = {name: np.array([n for s in all_stats for n in getattr(s, f"{name}_lengths")]) for name in ("prompt", "chosen", "rejected")}
    summary = {
        "records": sum(s.records for s in all_stats),
        "kept": manifest.num_samples,
        "shards": len(shards),
        "dropped": {reason: len(wheres) for reason, wheres in by_reason.items()},
        "truncated_prompt": sum(s.truncated_prompt for s in all_stats),
        "truncated_response": sum(s.truncated_response for s in all_stats),
        "token_percentiles": {
            name: {f"p{q}": int(np.percentile(values, q)) for q in (50, 90, 99, 100)} if len(values) else {}
            for name, values in {**lengths, "pair": np.array([n for s in all_stats for n in s.lengths])}.items()
        },
    }
    report = {**summary, "dropped_records": [{"where": w, "reason": r} for w, r in dropped]}
    atomic_write_bytes(out_dir / REPORT_NAME, json.dumps(report, indent=1).encode())
    log(format_summary(summary, by_reason, out_dir))
    return summary


def _refuse_if_nothing_kept(input_path: Path, folders: list[Path]) -> None:
    """An InputError when no record was kept: an empty shard set would only fail later, in the trainer's
    pre-flight, far from the cause. It names the commonest reason, one record it applies to, and the
    report that lists every record."""
    reports = [json.loads((folder / REPORT_NAME).read_text()) for folder in folders]
    if any(report["kept"] for report in reports):
        return
    dropped = [entry for report in reports for entry in report["dropped_records"]]
    by_reason: dict[str, list[dict]] = {}
    for entry in dropped:
        by_reason.setdefault(entry["reason"].split(":")[0], []).append(entry)
    entries = max(by_reason.values(), key=len)
    raise InputError(f"--input {input_path}: none of its {len(dropped)} records was kept; the commonest reason "
                     f"({len(entries)} records, e.g. {entries[0]['where']}): {entries[0]['reason']}; every record "
                     f"with its reason: {', '.join(str(folder / REPORT_NAME) for folder in folders)}")


def format_summary(summary: dict, by_reason: dict[str, list[str]], out_dir: Path) -> str:
    lines = [
        f"prepare_pairs: {summary['records']} records -> {summary['kept']} pairs in {summary['shards']} shards ({out_dir})",
        f"  dropped {summary['records'] - summary['kept']}" + ("" if by_reason else " (none)"),
    ]
    for reason, wheres in sorted(by_reason.items()):
        shown = ", ".join(wheres[:8]) + (f", ... ({len(wheres) - 8} more)" if len(wheres) > 8 else "")
        lines.append(f"    {reason}: {len(wheres)} ({shown})")
    lines.append(f"  truncated: {summary['truncated_prompt']} prompts (left), {summary['truncated_response']} pairs' responses (right)")
    for name, pct in summary["token_percentiles"].items():
        lines.append(f"  {name} tokens: " + ", ".join(f"{k} {v}" for k, v in pct.items()).replace("p100", "max"))
    lines.append(f"  every record not kept, with its reason: {out_dir / REPORT_NAME}")
    return "\n".join(lines)

