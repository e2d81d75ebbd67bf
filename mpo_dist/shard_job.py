"""Shard-parallel jobs over a pairs shard set: every rank takes its share, resumable, with progress.

Used by the reference tools (scoring, D_ref sampling). Output shard `i` depends only on input shard
`i` (never on the rank or the number of ranks), rank `r` of `W` makes the shards with `i % W == r`,
each is written atomically, and a finished shard is skipped by a rerun, so a crashed or preempted
job is resumed by running it again. Rank 0 reports progress with rate and ETA, then writes the
manifest after all ranks are done.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mpo_dist.data.shards import MANIFEST_NAME, ShardInfo, atomic_write_bytes

JOB_FILE = ".job.json"


def manifest_fingerprint(shard_dir: Path) -> str:
    return "sha256:" + hashlib.sha256((Path(shard_dir) / MANIFEST_NAME).read_bytes()).hexdigest()[:32]


def claim_output_dir(name: str, out_dir: Path, params: dict[str, Any]) -> None:
    """Record what the shards in `out_dir` are made from; a rerun must match, so a resumed job never
    mixes shards of two models or two settings."""
    job_file = out_dir / JOB_FILE
    if job_file.exists():
        previous = json.loads(job_file.read_text())
        changed = sorted(key for key in set(previous) | set(params) if previous.get(key) != params.get(key))
        if changed:
            raise ValueError(f"--out {out_dir} holds {name} shards made with other settings ({', '.join(changed)} "
                             f"differ, see {job_file}); use a new --out folder or delete this one")
        return
    if out_dir.exists() and any(out_dir.glob("shard-*.tar")):
        raise ValueError(f"--out {out_dir} already holds shards not made by this {name} job; use a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(job_file, json.dumps(params, indent=1, sort_keys=True).encode())


def remove_stale_temp_files(out_dir: Path) -> int:
    """Temp files of shards whose writer was killed: safe to delete before any rank starts writing."""
    stale = [path for path in out_dir.glob(".*.tmp-*") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def run_shard_job(
    name: str,
    shards: list[ShardInfo],
    out_dir: Path,
    make_shard: Callable[[int, ShardInfo], int],
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    log: Callable[[str], None],
    params: dict[str, Any] | None = None,
    unit: str = "tokens",
) -> dict:
    """Run `make_shard(index, shard) -> amount of work` for this rank's unfinished shards.

    `params` (checked by rank 0) describe what the shards are made from. Returns this rank's
    totals: shards made, shards skipped, work done and seconds.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        claim_output_dir(name, out_dir, params or {})
        removed = remove_stale_temp_files(out_dir)
        if removed:
            log(f"{name}: removed {removed} temp files left by an interrupted run")
    barrier()  # nobody writes before the stale files are gone
    mine = [(index, shard) for index, shard in enumerate(shards) if index % world_size == rank]
    todo = [(index, shard) for index, shard in mine if not (out_dir / shard.name).exists()]
    if rank == 0 and len(todo) < len(mine):
        log(f"{name}: {len(mine) - len(todo)} of rank 0's {len(mine)} shards already done; resuming")
    start, work = time.monotonic(), 0
    for done, (index, shard) in enumerate(todo, 1):
        work += make_shard(index, shard)
        if rank == 0:
            elapsed = time.monotonic() - start
            log(f"{name}: rank 0 {done}/{len(todo)} shards, {work / elapsed:,.0f} {unit}/s, "
                f"ETA {elapsed / done * (len(todo) - done):.0f}s (each of {world_size} ranks does about as much)")
    seconds = time.monotonic() - start
    barrier()
    missing = [shard.name for shard in shards if not (out_dir / shard.name).exists()]
    if missing:
        raise RuntimeError(f"{name}: {len(missing)} shards missing after every rank finished ({missing[:3]}...); rerun")
    return {"made": len(todo), "skipped": len(mine) - len(todo), "work": work, "seconds": seconds}


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_tool(name: str, body: Callable[..., None], backend: str | None = None) -> int:
    """A tool's `main`: join the process group (torchrun) or run alone, report input errors in one
    line per rank with exit code 2, always leave the process group."""
    from mpo_dist.distributed import destroy_distributed, init_distributed

    info = init_distributed(backend=backend)
    try:
        body(info)
    except (ValueError, FileNotFoundError) as error:
        print(f"{name}: error on rank {info.rank}: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_distributed()
    return 0

