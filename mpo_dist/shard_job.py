"""Shard-parallel jobs over a pairs shard set: every rank takes its share, resumable, with progress.

Used by the reference tools (scoring, D_ref sampling). Output shard `i` depends only on input shard
`i` (never on the rank or the number of ranks), rank `r` of `W` makes the shards with `i % W == r`,
each is written atomically, and a finished shard is skipped by a rerun, so a crashed or preempted
job is resumed by running it again. Rank 0 reports progress with rate and ETA, then writes the
manifest after all ranks are done.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from mpo_dist.data.shards import ShardInfo


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
    unit: str = "tokens",
) -> dict:
    """Run `make_shard(index, shard) -> amount of work` for this rank's unfinished shards.

    Returns this rank's totals: shards made, shards skipped, work done and seconds.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
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

