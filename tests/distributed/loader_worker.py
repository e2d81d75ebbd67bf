"""Run under torchrun: every rank streams its share with 2 workers and joins a collective per batch.

If ranks yielded different numbers of batches, the all_reduce below would block until the timeout.
Rank 0 writes, for every rank, its (key, is_pad, epoch) samples and each batch's (epoch, epoch_progress) to
the JSON file named by argv[2].
"""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from mpo_dist.config import DataConfig
from mpo_dist.data.loader import build_pair_loader


def main() -> None:
    root, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    data = DataConfig(pairs=f"{root}/pairs", reference=f"{root}/ref", batch_size=3, num_workers=2, shuffle_window=8,
                      batching=sys.argv[3], max_tokens=200 if sys.argv[3] == "tokens" else 0)
    loader = build_pair_loader(data, seed=11, dp_rank=rank, dp_world_size=world, num_epochs=2)
    seen, progress = [], []
    for batch in loader:
        step = torch.ones(1)
        dist.all_reduce(step)  # a step's collective: every rank must be here the same number of times
        seen += [(key, bool(pad), batch["epoch"]) for key, pad in zip(batch["keys"], batch["is_pad"])]
        progress.append((batch["epoch"], batch["epoch_progress"]))
    gathered = [None] * world
    dist.all_gather_object(gathered, {"samples": seen, "progress": progress})
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(gathered, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
