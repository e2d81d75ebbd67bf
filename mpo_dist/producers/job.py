"""Resumable jobs that write a folder of shards on one process or many: the one mechanism behind the
tools that make shards (prepare_pairs, score_reference, sample_reference).

- `start_job`: rank 0 claims the output folder (`OUT/.job.json` records what the output is made
  from; a rerun with the same parameters resumes, other parameters or a folder holding anything
  else are refused naming `--out`) and removes temp files of writers that were killed; no rank
  writes before that is done.
- progress (`mpo_dist.progress.Progress`): on rank 0, shards done, rate and ETA: an updating line
  on a terminal, a plain line every few seconds otherwise.
- `run_shard_job`: output shard `i` depends only on input shard `i` (never on the rank or the number
  of ranks); rank `r` of `W` makes the shards with `i % W == r`, each written atomically, and a
  finished shard is skipped by a rerun, so a crashed or preempted job is resumed by running it again.

Each job's own step (e.g. prepare's sharding by record index) decides what "finished" means; the
claim, the temp-file sweep and the progress lines are shared.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from mpo_dist.data.shards import JOB_FILE, ShardInfo, atomic_write_bytes, check_shard_name, manifest_fingerprint
from mpo_dist.distributed import barrier, raise_on_every_rank
from mpo_dist.errors import InputError
from mpo_dist.progress import Progress, stderr_log  # noqa: F401  (stderr_log: the shard tools' log, imported from here)


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")


def made_from(pairs_dir: Path, pairs_tokenizer_hash: str, model, model_info: dict | None) -> dict[str, Any]:
    """The provenance a reference or D_ref manifest records: the pairs (folder and fingerprint) and the
    model (path, weights hash, dtype, tokenizer hash). Without `model_info` (a model handed in by
    code, not a tool) the dtype is read from the model's parameters."""
    record = dict((model_info or {}).get("model") or {})
    if "dtype" not in record:
        param = next(iter(model.parameters()), None)
        record["dtype"] = None if param is None else str(param.dtype).removeprefix("torch.")
    record.setdefault("tokenizer_hash", pairs_tokenizer_hash)
    return {"pairs": str(Path(pairs_dir).resolve()), "pairs_fingerprint": manifest_fingerprint(pairs_dir),
            **(model_info or {}), "model": record}


def claim_output_dir(name: str, out_dir: Path, params: dict[str, Any]) -> None:
    """Record what the output in `out_dir` is made from; a rerun must match, so a resumed job never
    mixes shards of two models, two inputs or two settings."""
    job_file = out_dir / JOB_FILE
    params = json.loads(json.dumps(params))  # compare as the file stores them (tuples become lists)
    if job_file.exists():
        previous = json.loads(job_file.read_text())
        changed = sorted(key for key in set(previous) | set(params) if previous.get(key) != params.get(key))
        if changed and not holds_output(out_dir):
            # A run that stopped before writing anything (e.g. --strict at the first record) left only its
            # claim: nothing would be mixed, so a run with other settings (a fixed input) takes the folder.
            atomic_write_bytes(job_file, json.dumps(params, indent=1, sort_keys=True).encode())
            return
        if changed:
            raise InputError(f"--out {out_dir} holds output made with other settings ({', '.join(changed)} differ, "
                             f"see {job_file}); use a new --out folder or delete this one")
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"--out {out_dir} is not empty and was not written by {name}; use a new --out folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(job_file, json.dumps(params, indent=1, sort_keys=True).encode())


def holds_output(out_dir: Path) -> bool:
    """Whether `out_dir` holds any file but the job's claim and temp files of killed writers."""
    return any(path.is_file() and path.name != JOB_FILE and ".tmp-" not in path.name for path in out_dir.rglob("*"))


def release_output_dir(out_dir: Path) -> None:
    """Undo a claim that produced nothing (the run stopped before its first shard): the folder is left
    free for a rerun with any settings (empty folders below it removed). A folder holding output is left alone."""
    if not out_dir.is_dir() or holds_output(out_dir):
        return
    (out_dir / JOB_FILE).unlink(missing_ok=True)
    for path in sorted(out_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def remove_stale_temp_files(out_dir: Path) -> int:
    """Temp files (`.NAME.tmp-PID`, anywhere under `out_dir`) of writers that were killed: safe to
    delete before any rank starts writing."""
    stale = [path for path in out_dir.rglob(".*.tmp-*") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def start_job(name: str, out_dir: Path, params: dict[str, Any], *, rank: int, log: Callable[[str], None]) -> None:
    """Rank 0 claims `out_dir` for `params` and sweeps temp files; every rank waits until it has.

    Rank 0 alone decides, so `params` may hold what only rank 0 computes (the weights hash). When it
    refuses the folder, every other rank raises an input error too, so the job ends with one line
    per rank and exit code 2 rather than with ranks dying in a later collective.
    """
    refused = None
    if rank == 0:
        try:
            claim_output_dir(name, out_dir, params)
        except InputError as error:
            refused = error
        else:
            removed = remove_stale_temp_files(out_dir)
            if removed:
                log(f"{name}: removed {removed} temp files left by an interrupted run")
    # Nobody writes before the folder is claimed and swept.
    raise_on_every_rank(refused, lambda: InputError(f"--out {out_dir} was refused by rank 0 (its message says why)"))


def run_shard_job(
    name: str,
    shards: list[ShardInfo],
    out_dir: Path,
    make_shard: Callable[[int, ShardInfo], int],
    *,
    rank: int,
    world_size: int,
    log: Callable[[str], None],
    params: dict[str, Any],
    unit: str = "tokens",
    after_shards: Callable[[], None] = lambda: None,
) -> dict:
    """Run `make_shard(index, shard) -> amount of work` for this rank's unfinished shards.

    `params` describe what the shards are made from (see `start_job`). `after_shards` runs once this
    rank's shards are made, before the ranks wait for each other (a sharded model's idle forwards:
    `inference_model.InferenceModel.finish`). Returns this rank's totals: shards made, shards
    skipped, work done, seconds and rate.
    """
    for shard in shards:  # output names come from an input manifest: never a path out of --out
        check_shard_name(shard.name, f"--out {out_dir}")
    start_job(name, out_dir, params, rank=rank, log=log)
    mine = [(index, shard) for index, shard in enumerate(shards) if index % world_size == rank]
    todo = [(index, shard) for index, shard in mine if not (out_dir / shard.name).exists()]
    if rank == 0 and len(todo) < len(mine):
        log(f"{name}: {len(mine) - len(todo)} of rank 0's {len(mine)} shards already done; resuming")
    # The first shard is reported at once: shards are few and slow, the first line shows the rate. The
    # share done counts samples, not shards: shards differ in size, the last one most.
    progress = Progress(name, "shards", log, total=len(todo), work_unit=unit, enabled=rank == 0, first_after_s=0.0,
                        detail=f"rank 0 of {world_size}, " if world_size > 1 else "")
    start, work, samples = time.monotonic(), 0, 0
    total_samples = sum(shard.num_samples for _, shard in todo)
    if todo:
        progress.update(0, work=0, fraction=0.0)  # on a terminal: the job and its shards, before the first is done
    for done, (index, shard) in enumerate(todo, 1):
        work += make_shard(index, shard)
        samples += shard.num_samples
        progress.update(done, work=work, fraction=samples / total_samples if total_samples else None)
    progress.close()
    seconds = time.monotonic() - start
    after_shards()
    barrier()
    missing = [shard.name for shard in shards if not (out_dir / shard.name).exists()]
    if missing:
        raise RuntimeError(f"{name}: {len(missing)} shards missing after every rank finished ({missing[:3]}...); rerun")
    return {"made": len(todo), "skipped": len(mine) - len(todo), "work": work, "seconds": seconds,
            "rate": work / seconds if seconds else 0.0}


def describe_totals(totals: dict, unit: str = "tokens") -> str:
    """Rank 0's share of a finished `run_shard_job`, for the tool's summary line."""
    return (f"rank 0: {totals['made']} shards made, {totals['skipped']} already done, "
            f"{totals['rate']:,.0f} {unit}/s")
