"""Checks of a run's inputs before step 1: where they came from, and every shard the run will read.

- `check_provenance` (manifests only, instant): the reference and D_ref must have been made from
  these pairs (the pairs manifest fingerprint they record), and their dtype should be the
  training `model.dtype` (warned or refused, `on_dtype_mismatch`).
- `preflight_check` (reads every byte once): each tar's members against its manifest (count,
  order, extension, per-sample lengths, a damaged header told apart from truncation), record
  checksums, required fields, token ids within the vocabulary, finite log-probs consistent with
  token counts, and pairs and reference keys in lockstep (and D_ref keys `KEY-sK` when D_ref was
  sampled from these pairs). Rank r of W checks the shards i % W == r, then the ranks combine
  the verdict: the rank that found problems raises one ShardError listing them (one line each,
  naming shard, key and field, at most `max_problems`; token ids outside the vocabulary are counted
  in one line naming the first); every other rank raises an InputError
  saying the check failed on another rank, so the job ends with exit 2 on every rank.
- `check_training_inputs`: both, the one call the trainer makes before it builds the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mpo_dist.data.samples import (
    OutOfVocabulary,
    ShardSet,
    check_reference_matches,
    describe,
    dref_problem,
    pair_problem,
    reference_problem,
    vocab_limit,
)
from mpo_dist.data.shards import (DamagedRecordError, Manifest, ShardCursor, ShardError, ShardInfo,
                                  manifest_fingerprint)
from mpo_dist.distributed import all_ranks_succeeded
from mpo_dist.errors import InputError

MAX_PROBLEMS = 20


@dataclass
class PreflightReport:
    """What this rank checked: shard files, records (pairs + reference + D_ref) and pairs, in seconds."""

    shards: int = 0
    records: int = 0
    pairs: int = 0
    seconds: float = 0.0

    def describe(self, world_size: int) -> str:
        return (f"pre-flight: rank 0 of {world_size} checked {self.shards} shard files, {self.records:,} records "
                f"({self.pairs:,} pairs) in {self.seconds:.1f}s")


class _Problems:
    """The problems this rank found: the first `cap` lines, a count of the rest, and token ids outside
    the vocabulary counted in one line naming the first (shards of another tokenizer have them in
    nearly every sample: a line each would bury the cause, and any other problem)."""

    def __init__(self, cap: int):
        self.lines: list[str] = []
        self.cap, self.more = cap, 0
        self.out_of_vocabulary, self._first_out_of_vocabulary = 0, ""

    def add(self, line: str) -> None:
        if len(self.lines) < self.cap:
            self.lines.append(line)
        else:
            self.more += 1

    def add_sample(self, path: Path, key: str, problem: str) -> None:
        if not isinstance(problem, OutOfVocabulary):
            self.add(describe(path, key, problem))
            return
        self.out_of_vocabulary += 1
        if self.out_of_vocabulary == 1:
            self._first_out_of_vocabulary = describe(path, key, problem)

    @property
    def count(self) -> int:
        return len(self.lines) + self.more + self.out_of_vocabulary

    def __bool__(self) -> bool:
        return self.count > 0

    def report(self) -> list[str]:
        """The lines to show: at most `cap` + 2 (the vocabulary line and '... and N more')."""
        lines = list(self.lines)
        if self.out_of_vocabulary == 1:
            lines.insert(0, self._first_out_of_vocabulary)
        elif self.out_of_vocabulary:
            lines.insert(0, f"{self.out_of_vocabulary} samples hold token ids outside the vocabulary, the first: "
                            f"{self._first_out_of_vocabulary}; were they tokenized with another tokenizer than the "
                            "model's? Re-make them with its tokenizer (tools/prepare_pairs.py --tokenizer MODEL_DIR)")
        if self.more:
            lines.append(f"... and {self.more} more")
        return lines


# ---------------------------------------------------------------------------- provenance


def recorded_pairs_fingerprint(manifest: Manifest) -> str | None:
    """The pairs fingerprint a reference or D_ref set was made from (None: a set made by hand)."""
    return manifest.info.get("pairs_fingerprint") or None


def check_provenance(pairs_manifest: Manifest, pairs_dir: str | Path, reference_manifest: Manifest | None = None,
                     reference_dir: str | Path | None = None, dref_manifest: Manifest | None = None,
                     dref_dir: str | Path | None = None, model_dtype: str | None = None,
                     on_dtype_mismatch: str = "warn", log: Callable[[str], None] = print) -> None:
    """Refuse a reference or D_ref made from other pairs; warn (or refuse) when it was made in
    another dtype than `model_dtype`, the resolved name (never auto: which dtype it means depends on the
    machine, and the tools record what they resolved). Sets that record neither are not checked (made by hand)."""
    if on_dtype_mismatch not in ("warn", "error"):
        raise ValueError(f"on_dtype_mismatch must be 'warn' or 'error', got {on_dtype_mismatch!r}")
    if model_dtype == "auto":
        raise ValueError("model_dtype must be resolved first (compute_dtype.resolve_dtype), got 'auto'")
    fingerprint = manifest_fingerprint(Path(pairs_dir))
    for name, manifest, directory, tool in (("data.reference", reference_manifest, reference_dir, "score_reference"),
                                            ("data.dref", dref_manifest, dref_dir, "sample_reference")):
        if manifest is None:
            continue
        recorded = recorded_pairs_fingerprint(manifest)
        if recorded is not None and recorded != fingerprint:
            made_from = manifest.info.get("pairs", "other pairs")
            raise InputError(
                f"{name} {directory} was made from other pairs than data.pairs {pairs_dir} (pairs fingerprint "
                f"{recorded}, made from {made_from}; data.pairs is {fingerprint}): re-run tools/{tool}.py "
                f"--pairs {pairs_dir} --out NEW_FOLDER and point {name} at it")
        dtype = (manifest.info.get("model") or {}).get("dtype") if isinstance(manifest.info.get("model"), dict) else None
        if model_dtype is not None and dtype is not None and dtype != model_dtype:
            message = (f"{name} {directory} was made with the reference model in {dtype}, but model.dtype={model_dtype}: "
                       f"the policy's log-probs at step 1 will differ from the stored ones (a non-zero margin and KL "
                       f"with policy = reference); re-run tools/{tool}.py --dtype {model_dtype} or set "
                       f"model.dtype={dtype}")
            if on_dtype_mismatch == "error":
                raise InputError(message)
            log(f"WARNING: {message}")


# ---------------------------------------------------------------------------- shard check


@dataclass
class _Sets:
    pairs: ShardSet
    reference: ShardSet | None
    dref: ShardSet | None
    dref_per_pair: int  # D_ref samples per prompt when D_ref was sampled from these pairs (keys KEY-sK), else 0


def _open_sets(pairs_dir, reference_dir, dref_dir) -> _Sets:
    pairs = ShardSet(pairs_dir, "pairs")
    reference = ShardSet(reference_dir, "ref_logps") if reference_dir else None
    if reference is not None:
        check_reference_matches(pairs, reference)
    dref = ShardSet(dref_dir, "dref") if dref_dir else None
    per_pair = 0
    if dref is not None:
        if dref.manifest.tokenizer_hash != pairs.manifest.tokenizer_hash:
            raise ShardError(f"{dref.directory}: tokenizer {dref.manifest.tokenizer_hash} differs from the pairs' "
                             f"{pairs.manifest.tokenizer_hash} ({pairs.directory}); resample D_ref with the policy's tokenizer")
        sampling = dref.manifest.info.get("sampling")
        same_shards = [s.name for s in dref.manifest.shards] == [s.name for s in pairs.manifest.shards]
        if (isinstance(sampling, dict) and same_shards and recorded_pairs_fingerprint(dref.manifest)
                == manifest_fingerprint(pairs.directory)):
            per_pair = int(sampling.get("num_samples") or 0)
    return _Sets(pairs, reference, dref, per_pair)


def _read_all(cursor: ShardCursor, problems: _Problems):
    """(index, key, meta, arrays) of every readable sample; a damaged record is reported and skipped,
    damage to the tar itself is reported and ends the shard."""
    for index in range(cursor.num_samples):
        try:
            yield (index, *cursor.read(index))
        except DamagedRecordError as error:
            problems.add(str(error))
        except ShardError as error:
            problems.add(str(error))
            return
        except (OSError, ValueError) as error:  # anything else the file system or the decoder says
            problems.add(f"{cursor.path}: unreadable ({type(error).__name__}: {error})")
            return


def _check_pairs_shard(sets: _Sets, shard: ShardInfo, vocab: int | None, problems: _Problems, report) -> list[str]:
    path = sets.pairs.directory / shard.name
    reference = (ShardCursor(sets.reference.directory / shard.name, "ref_logps", shard.num_samples, in_memory=True)
                 if sets.reference is not None else None)
    ref_path = None if reference is None else reference.path
    ref_records = iter(_read_all(reference, problems)) if reference is not None else None
    keys: list[str] = []
    in_step, pending = True, None
    for index, key, meta, arrays in _read_all(ShardCursor(path, "pairs", shard.num_samples, in_memory=True), problems):
        keys.append(key)
        report.records += 1
        report.pairs += 1
        problem = pair_problem(meta, arrays, vocab)
        if problem is None and shard.lengths is not None:
            length = len(arrays["prompt_ids"]) + max(len(arrays["chosen_ids"]), len(arrays["rejected_ids"]))
            if length != shard.lengths[index]:
                problem = f"manifest lists length {shard.lengths[index]}, the record has {length} tokens"
        if problem:
            problems.add_sample(path, key, problem)
        if ref_records is None or not in_step:
            continue
        ref = pending or next(ref_records, None)
        while ref is not None and ref[0] < index:  # this pair was damaged and skipped
            ref = next(ref_records, None)
        if ref is None:
            in_step = False
            continue
        pending = ref if ref[0] > index else None  # a damaged reference record was skipped
        if pending is not None:
            continue
        report.records += 1
        _, ref_key, ref_meta, _ = ref
        if ref_key != key:
            problems.add(f"{ref_path}: sample {index} has key '{ref_key}' but {path} has '{key}': reference keys "
                         "out of order or missing; re-run tools/score_reference.py")
            in_step = False
            continue
        problem = reference_problem(ref_meta, arrays)
        if problem:
            problems.add_sample(ref_path, key, problem)
    if ref_records is not None and in_step:
        for _ in ref_records:  # the reference's own end-of-tar check
            pass
    if len(set(keys)) != len(keys):
        problems.add(f"{path}: a sample key appears twice ({len(keys) - len(set(keys))} repeats)")
    return keys


def _check_dref_shard(sets: _Sets, shard: ShardInfo, vocab: int | None, problems: _Problems, report,
                      pair_keys: list[str] | None) -> None:
    path = sets.dref.directory / shard.name
    expected = None
    if pair_keys is not None:
        expected = [f"{key}-s{k}" for key in pair_keys for k in range(sets.dref_per_pair)]
    for index, key, meta, arrays in _read_all(ShardCursor(path, "dref", shard.num_samples, in_memory=True), problems):
        report.records += 1
        if expected is not None and index < len(expected) and key != expected[index]:
            problems.add(f"{path}: sample {index} has key '{key}', expected '{expected[index]}' (D_ref keys follow "
                         f"the pairs' keys); re-run tools/sample_reference.py")
            expected = None
        problem = dref_problem(meta, arrays, vocab)
        if problem is None and shard.lengths is not None:
            length = len(arrays["prompt_ids"]) + len(arrays["response_ids"])
            if length != shard.lengths[index]:
                problem = f"manifest lists length {shard.lengths[index]}, the record has {length} tokens"
        if problem:
            problems.add_sample(path, key, problem)


def _check_shards(sets: _Sets, vocab_size: int | None, rank: int, world_size: int, problems: _Problems, report) -> None:
    pairs_vocab = vocab_limit(sets.pairs.manifest, vocab_size)
    dref_vocab = vocab_limit(sets.dref.manifest, vocab_size) if sets.dref is not None else None
    dref_by_name = {s.name: s for s in sets.dref.manifest.shards} if sets.dref is not None else {}
    tasks = [("pairs", shard) for shard in sets.pairs.manifest.shards]
    if not sets.dref_per_pair:
        tasks += [("dref", shard) for shard in dref_by_name.values()]
    for index, (kind, shard) in enumerate(tasks):
        if index % world_size != rank:
            continue
        if kind == "dref":
            report.shards += 1
            _check_dref_shard(sets, shard, dref_vocab, problems, report, None)
            continue
        report.shards += 1 + (sets.reference is not None)
        keys = _check_pairs_shard(sets, shard, pairs_vocab, problems, report)
        if sets.dref_per_pair:
            report.shards += 1
            _check_dref_shard(sets, dref_by_name[shard.name], dref_vocab, problems, report,
                              keys if len(keys) == shard.num_samples else None)


def preflight_check(pairs_dir: str | Path, reference_dir: str | Path | None = None, dref_dir: str | Path | None = None,
                    *, vocab_size: int | None = None, rank: int = 0, world_size: int = 1,
                    max_problems: int = MAX_PROBLEMS) -> PreflightReport:
    """Check every shard of the run (this rank's share), then combine the verdict over all ranks (a
    collective: every rank calls it). Returns this rank's report, or raises (see the module doc)."""
    start = time.monotonic()
    problems, report = _Problems(max_problems), PreflightReport()
    failed_quietly = False
    try:
        try:
            sets = _open_sets(pairs_dir, reference_dir, dref_dir)
        except ShardError as error:  # every rank reads the same manifests: rank 0 alone reports them
            sets = None
            if rank == 0:
                problems.add(str(error))
            failed_quietly = rank != 0
        if sets is not None:
            _check_shards(sets, vocab_size, rank, world_size, problems, report)
    except BaseException:
        all_ranks_succeeded(False)  # the others stop cleanly instead of waiting in a later collective
        raise
    report.seconds = time.monotonic() - start
    everyone_ok = all_ranks_succeeded(not problems and not failed_quietly)
    if problems:
        raise ShardError(f"pre-flight shard check found {problems.count} problem(s) (rank {rank} of "
                         f"{world_size}); fix or re-make these shards before training:\n  " + "\n  ".join(problems.report()))
    if not everyone_ok:
        raise InputError("pre-flight shard check failed on another rank (its message lists the problems)")
    return report


def _weights_hash(manifest: Manifest) -> str | None:
    model = manifest.info.get("model")
    return model.get("weights_hash") if isinstance(model, dict) else None


def check_eval_inputs(eval_pairs_dir: str | Path | None, eval_reference_dir: str | Path | None,
                      eval_dref_dir: str | Path | None, *, train_pairs_dir: str | Path,
                      train_reference_dir: str | Path | None, require_held_out: bool = True) -> None:
    """Held-out inputs that cannot serve (manifests only): an eval reference made from other pairs than
    eval.pairs, or scored by another model than data.reference (its numbers would not compare with
    training); with `require_held_out`, eval pairs that are the training pairs and an eval D_ref
    sampled from the training prompts (its KL would be the optimistic training-set figure)."""
    train_fingerprint = manifest_fingerprint(Path(train_pairs_dir))
    train_model = _weights_hash(read_manifest("data.reference", train_reference_dir, "ref_logps")) if train_reference_dir else None
    if eval_pairs_dir:
        if require_held_out and manifest_fingerprint(Path(eval_pairs_dir)) == train_fingerprint:
            raise InputError(f"eval.pairs {eval_pairs_dir} is the training set data.pairs {train_pairs_dir}; hold pairs out "
                             "with tools/prepare_pairs.py --eval-fraction, or set eval.require_held_out=false")
        reference = read_manifest("eval.reference", eval_reference_dir, "ref_logps")
        recorded = recorded_pairs_fingerprint(reference)
        if recorded is not None and recorded != manifest_fingerprint(Path(eval_pairs_dir)):
            raise InputError(f"eval.reference {eval_reference_dir} was made from other pairs than eval.pairs "
                             f"{eval_pairs_dir}: re-run tools/score_reference.py --pairs {eval_pairs_dir}")
        eval_model = _weights_hash(reference)
        if train_model and eval_model and eval_model != train_model:
            raise InputError(f"eval.reference {eval_reference_dir} was scored by another model ({eval_model}) than "
                             f"data.reference {train_reference_dir} ({train_model}); score the eval pairs with the "
                             "training run's reference model")
    if eval_dref_dir:
        dref = read_manifest("eval.dref", eval_dref_dir, "dref")
        if require_held_out and recorded_pairs_fingerprint(dref) == train_fingerprint:
            raise InputError(f"eval.dref {eval_dref_dir} was sampled from the training prompts (data.pairs "
                             f"{train_pairs_dir}): its KL would be the optimistic training-set figure; sample it from "
                             "held-out prompts (prepare_pairs --eval-fraction), or set eval.require_held_out=false")
        dref_model = _weights_hash(dref)
        if train_model and dref_model and dref_model != train_model:
            raise InputError(f"eval.dref {eval_dref_dir} was sampled from another model ({dref_model}) than the "
                             f"reference of data.reference ({train_model}); sample it with the training run's reference")


def read_manifest(option: str, directory: str | Path, kind: str) -> Manifest:
    """A shard folder's manifest; an error names the config option of the folder (e.g. data.pairs)."""
    try:
        return Manifest.read(directory, kind)
    except ShardError as error:
        raise ShardError(f"{option}={directory}: {error}") from error


def check_training_inputs(pairs_dir: str | Path, reference_dir: str | Path | None = None,
                          dref_dir: str | Path | None = None, *, vocab_size: int | None = None,
                          model_dtype: str | None = None, rank: int = 0, world_size: int = 1, preflight: bool = True,
                          on_dtype_mismatch: str = "warn", log: Callable[[str], None] = print) -> PreflightReport | None:
    """Provenance (always: manifests only) and, with `preflight`, the shard check; logs its cost.
    Errors name the config option of the folder at fault (data.pairs, data.reference, data.dref)."""
    pairs = read_manifest("data.pairs", pairs_dir, "pairs")
    reference = read_manifest("data.reference", reference_dir, "ref_logps") if reference_dir else None
    dref = read_manifest("data.dref", dref_dir, "dref") if dref_dir else None
    check_provenance(pairs, pairs_dir, reference, reference_dir, dref, dref_dir, model_dtype, on_dtype_mismatch, log)
    if not preflight:
        return None
    report = preflight_check(pairs_dir, reference_dir, dref_dir, vocab_size=vocab_size, rank=rank, world_size=world_size)
    log(report.describe(world_size))
    return report
