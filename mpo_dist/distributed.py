"""Process-group set-up and teardown, and the rank facts the rest of the code is handed explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info_from_env() -> RankInfo:
    """What torchrun (or SLURM via torchrun) says about this process; one process when unset."""
    return RankInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(backend: str | None = None, timeout_s: float = 1800) -> RankInfo:
    """Join the process group when launched by torchrun with several processes.

    The backend defaults to NCCL when CUDA is available and gloo otherwise (CPU tests, tools).
    """
    info = rank_info_from_env()
    if info.world_size > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return info


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
