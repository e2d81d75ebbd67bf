"""Score pairs shards with the reference model: reference log-prob shards for the trainer.

    python tools/score_reference.py --model DIR --pairs DIR --out DIR [--batch-size N] [--dtype float32|bfloat16]

The same under `torchrun --nnodes N --nproc-per-node K ...`: each process scores its share of the
shards; the output does not depend on the number of processes. A rerun skips finished shards.
"""

import argparse
import sys

import torch

from mpo_dist.distributed import barrier, destroy_distributed, init_distributed
from mpo_dist.reference import score_pairs, weights_fingerprint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="reference model: a local Hugging Face folder")
    parser.add_argument("--pairs", required=True, help="pairs shards (tools/prepare_pairs.py)")
    parser.add_argument("--out", required=True, help="output folder for reference log-prob shards")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    info = init_distributed()
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
        model_info = {"model": {"path": args.model, "weights_hash": weights_fingerprint(args.model) if info.is_main else None,
                                "dtype": args.dtype}}
        score_pairs(model, args.pairs, args.out, rank=info.rank, world_size=info.world_size, batch_size=args.batch_size,
                    device=device, model_info=model_info, barrier=barrier)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"score_reference: error: {error}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
