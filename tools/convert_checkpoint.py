"""Convert a training checkpoint into a Hugging Face model folder (safetensors) for deployment.

    python tools/convert_checkpoint.py --checkpoint DIR --out DIR [--dtype float32|bfloat16] [--max-shard-size 5GB]

DIR is a checkpoint folder such as OUTPUT_DIR/checkpoints/step-00000100, written by any number of
processes. Runs on one CPU process; memory stays near one output shard.
"""

import sys

from mpo_dist.cli import add_progress_flag, run_main, tool_parser
from mpo_dist.convert import DTYPES, convert_checkpoint, parse_size


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (checkpoints/step-N)")
    parser.add_argument("--out", required=True, help="new folder for the Hugging Face model")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights")
    # type=parse_size: argparse reports a size it cannot read as a usage error (exit 2) naming the flag.
    parser.add_argument("--max-shard-size", default="5GB", type=parse_size,
                        help="largest safetensors file, e.g. 5GB, 500MB")
    add_progress_flag(parser)
    args = parser.parse_args(argv)
    return run_main("convert_checkpoint",
                    lambda info: convert_checkpoint(args.checkpoint, args.out, args.dtype, args.max_shard_size),
                    progress=args.progress)


if __name__ == "__main__":
    sys.exit(main())
