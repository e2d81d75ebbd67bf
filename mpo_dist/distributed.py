"""The process group and every collective the rest of the code uses.

This is the one module of `mpo_dist` that calls `torch.distributed` collectives; the others ask it
for rank facts (`RankInfo`, `is_main`, `device_for`) and for the few collectives they need
(`all_reduce_sum`, `barrier`). Each of them is a no-op without a process group, so the same code
runs in one plain process, under torchrun, and in unit tests.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from mpo_dist.errors import InputError


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info_from_env() -> RankInfo:
    """What torchrun (or SLURM via torchrun) says about this process; one process when unset."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return RankInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
    )


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "MASTER_ADDR" in os.environ


def collective_timeout_s() -> float:
    """How long a collective waits for a peer before it fails (MPO_DIST_COLLECTIVE_TIMEOUT_S, default
    1800 s). A peer whose processes die fails the others' collectives at once (the connection closes);
    a peer that goes silent (a network partition, a frozen host) is noticed only after this long."""
    value = os.environ.get("MPO_DIST_COLLECTIVE_TIMEOUT_S", "1800")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise InputError(f"MPO_DIST_COLLECTIVE_TIMEOUT_S={value!r}: expected a number of seconds > 0")
    return seconds


def init_distributed(backend: str | None = None, timeout_s: float | None = None,
                     single_process_group: bool = False) -> RankInfo:
    """Join the process group when several processes run; return this process's rank facts.

    The backend defaults to NCCL when CUDA is available and gloo otherwise (CPU, tools). With
    `single_process_group`, a process started without torchrun (plain `python -m ...`) gets a
    group of its own, for code that needs one at any size (FSDP2 meshes, DCP).
    """
    info = rank_info_from_env()
    if dist.is_initialized():
        return info
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_gpu(info))
    timeout = timedelta(seconds=collective_timeout_s() if timeout_s is None else timeout_s)
    if info.world_size > 1 or (single_process_group and launched_by_torchrun()):
        store = _store_of_this_restart(info, timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size, timeout=timeout)
    elif single_process_group:
        # No torchrun: nothing to rendezvous with, so an in-process store instead of env:// (RANK, MASTER_ADDR).
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return info


def rank_info_of_group() -> RankInfo:
    """This process's rank facts inside the process group that its entry point set up.

    For code that needs a group at any size (FSDP2 meshes, DCP), such as the Trainer: it never creates
    one, so the group is set up in one place only (`init_distributed`, called by `cli.run_main`; with
    `single_process_group=True` a plain one-process run gets a group too). The rank and world size are
    the group's; the node-local facts come from torchrun's environment.
    """
    if not dist.is_initialized():
        raise RuntimeError("no process group: run under cli.run_main(..., single_process_group=True), which "
                           "sets one up for a single process too, or create one before this call")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return RankInfo(rank=rank, world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def check_local_gpu(local_rank: int, local_world_size: int, device_count: int,
                    cuda_visible_devices: str | None = None) -> None:
    """NCCL puts each rank of a node on GPU LOCAL_RANK (`init_distributed`, `device_for`): raise an
    `InputError` naming the fix when this node has no such GPU (more processes than GPUs), instead of
    CUDA's "invalid device ordinal" from `torch.cuda.set_device`."""
    if 0 <= local_rank < device_count:
        return
    devices = f"{device_count} CUDA device{'' if device_count == 1 else 's'}"
    visible = "unset" if cuda_visible_devices is None else cuda_visible_devices or '""'
    fix = (f"use --nproc-per-node {device_count} (NCCL cannot put two ranks on one GPU)" if device_count > 0
           else "run on a node with a GPU, or use the gloo backend on CPUs")
    raise InputError(f"LOCAL_RANK {local_rank} has no GPU: this node sees {devices} (CUDA_VISIBLE_DEVICES={visible}), "
                     f"but torchrun started {local_world_size} process{'' if local_world_size == 1 else 'es'} on it; {fix}")


def local_gpu(info: RankInfo) -> torch.device:
    """This rank's GPU, cuda:LOCAL_RANK, checked to exist (`check_local_gpu`)."""
    check_local_gpu(info.local_rank, info.local_world_size, torch.cuda.device_count(),
                    os.environ.get("CUDA_VISIBLE_DEVICES"))
    return torch.device("cuda", info.local_rank)


def _store_of_this_restart(info: RankInfo, timeout: timedelta) -> dist.Store | None:
    """The rendezvous store for the process group, with keys of this restart only.

    torchrun's c10d rendezvous keeps one TCP store for the whole job and hands it to the workers of
    every restart (TORCHELASTIC_USE_AGENT_STORE) without a per-restart prefix, so after
    `--max-restarts` a new worker could read the dead workers' gloo/NCCL addresses left in it and
    fail to connect ("connectFullMesh failed", or a hang until the timeout). A prefix per
    restart (TORCHELASTIC_RESTART_COUNT) keeps each round's keys apart. None: let env:// decide.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=False, timeout=timeout)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"mpo_dist/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/restart_{restart}", store)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(info: RankInfo) -> torch.device:
    """This process's device: its local GPU (the one `init_distributed` sets), or the CPU."""
    return local_gpu(info) if torch.cuda.is_available() else torch.device("cpu")


def configure_cpu_threads(info: RankInfo, threads: int = 0) -> int:
    """Intra-op threads for this process: `threads` when given, else OMP_NUM_THREADS when set (torchrun
    sets 1 per process), else the machine's cores shared among the processes of this node, so several
    processes never oversubscribe the cores. Returns the number set."""
    if threads <= 0:
        from_env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(from_env) if from_env.isdigit() and int(from_env) > 0 else max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)
    return threads


def has_process_group() -> bool:
    """Whether collectives (and DCP's coordinated save and load) span a process group."""
    return dist.is_initialized()


def is_main() -> bool:
    """Rank 0 of the process group, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_ranks_succeeded(succeeded: bool) -> bool:
    """Whether `succeeded` holds on every rank (a collective: every rank calls it). Lets ranks that
    waited for another's check stop cleanly with it instead of dying in a later collective."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.is_initialized() and dist.get_backend() == "nccl" else None
    failures = all_reduce_sum(torch.tensor([0.0 if succeeded else 1.0], device=device))
    return failures.item() == 0


def raise_on_every_rank(error: BaseException | None, elsewhere: Callable[[], BaseException]) -> None:
    """After work that may fail on some ranks only (often rank 0's alone): a collective in which every
    rank raises when any failed, its own `error` or `elsewhere()`, so that no rank goes on to wait
    forever in a later collective."""
    if not all_ranks_succeeded(error is None):
        raise error if error is not None else elsewhere()


def wait_for_peers(seconds: float) -> bool:
    """Wait up to `seconds` for every rank to reach this point (a barrier that gives up); returns
    whether they all did. For ranks stopping on an input error: each had time to say what it found
    before the first exit makes torchrun stop the others."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    done = threading.Event()

    def barrier_then_set() -> None:
        try:
            dist.barrier()
            done.set()
        except Exception:  # a peer that left: nothing to wait for
            pass

    threading.Thread(target=barrier_then_set, daemon=True).start()
    return done.wait(seconds)


def log_main(message: str) -> None:
    """Print on rank 0 only (progress lines that every rank would repeat)."""
    if is_main():
        print(message, flush=True)
