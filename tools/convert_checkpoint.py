"""Convert a training checkpoint into a Hugging Face model folder (safetensors) for deployment.

    python tools/convert_checkpoint.py --checkpoint DIR --out DIR [--dtype float32|bfloat16] [--max-shard-size 5GB]

DIR is a checkpoint folder such as OUTPUT_DIR/checkpoints/step-00000100, written by any number of
processes. Runs on one CPU process; memory stays near one output shard.
"""

import argparse
import sys

from mpo_dist.convert import convert_checkpoint, parse_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (checkpoints/step-N)")
    parser.add_argument("--out", required=True, help="new folder for the Hugging Face model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(args.checkpoint, args.out, args.dtype, parse_size(args.max_shard_size))
    except (ValueError, FileNotFoundError) as error:
        print(f"convert_checkpoint: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
