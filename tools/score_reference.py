"""Score pairs shards with the reference model: reference log-prob shards for the trainer.

    python tools/score_reference.py --model DIR --pairs DIR --out DIR [--batch-size N] [--packing auto|always|never] [--dtype auto|float32|bfloat16] [--model-shards N]

The same under `torchrun --nnodes N --nproc-per-node K ...`: each process scores its share of the
shards, with the model sharded over the processes of its node (--model-shards), so no process holds
the whole model; the output does not depend on the number of processes. A rerun skips finished shards.
"""

import sys

from mpo_dist.cli import add_progress_flag, add_threads_flag, run_main, tool_parser
from mpo_dist.compute_dtype import DTYPE_CHOICES, DTYPE_HELP
from mpo_dist.data.layout import PACKING_CHOICES
from mpo_dist.inference_model import MODEL_SHARDS_HELP
from mpo_dist.producers.score import open_reference, score_pairs
from mpo_dist.producers.job import check_batch_size


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--model", required=True, help="reference model: a local Hugging Face folder")
    parser.add_argument("--pairs", required=True, help="pairs shards (tools/prepare_pairs.py)")
    parser.add_argument("--out", required=True, help="output folder for reference log-prob shards")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward")
    parser.add_argument("--packing", default="auto", choices=PACKING_CHOICES,
                        help="always: compute each pair as one packed sequence with its prompt shared; never: padded "
                             "rows; auto: per batch, whichever needs fewer FLOPs (the trainer's data.packing; the "
                             "numbers are the same to float rounding)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--model-shards", type=int, default=0, help=MODEL_SHARDS_HELP)
    add_threads_flag(parser)
    add_progress_flag(parser)
    args = parser.parse_args(argv)

    def body(info):
        check_batch_size(args.batch_size)  # before the model is loaded
        reference = open_reference(args.model, args.pairs, args.dtype, info, tool="score_reference",
                                   model_shards=args.model_shards)
        score_pairs(reference.model, args.pairs, args.out, rank=info.rank, world_size=info.world_size,
                    batch_size=args.batch_size, packing=args.packing, device=reference.device, model_info=reference.model_info)

    return run_main("score_reference", body, threads=args.threads, progress=args.progress)


if __name__ == "__main__":
    sys.exit(main())
