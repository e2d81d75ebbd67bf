"""Score pairs shards with the reference model: reference log-prob shards for the trainer.

    python tools/score_reference.py --model DIR --pairs DIR --out DIR [--batch-size N] [--dtype float32|bfloat16]

The same under `torchrun --nnodes N --nproc-per-node K ...`: each process scores its share of the
shards; the output does not depend on the number of processes. A rerun skips finished shards.
"""

import argparse
import sys
from pathlib import Path

import torch

from mpo_dist.data.shards import Manifest
from mpo_dist.distributed import barrier
from mpo_dist.reference import load_reference_model, score_pairs, weights_fingerprint
from mpo_dist.shard_job import run_tool


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="reference model: a local Hugging Face folder")
    parser.add_argument("--pairs", required=True, help="pairs shards (tools/prepare_pairs.py)")
    parser.add_argument("--out", required=True, help="output folder for reference log-prob shards")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    def body(info):
        device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        pairs = Manifest.read(args.pairs, "pairs")
        model = load_reference_model(args.model, pairs, Path(args.pairs), args.dtype, device)
        model_info = {"model": {"path": str(Path(args.model).resolve()), "dtype": args.dtype,
                                "weights_hash": weights_fingerprint(args.model) if info.is_main else None}}
        score_pairs(model, args.pairs, args.out, rank=info.rank, world_size=info.world_size,
                    batch_size=args.batch_size, device=device, model_info=model_info, barrier=barrier)

    return run_tool("score_reference", body)


if __name__ == "__main__":
    sys.exit(main())
