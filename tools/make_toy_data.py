"""Write the quickstart's toy preference task (digit sorting) and a tiny random-init model with its tokenizer.

    python tools/make_toy_data.py --out DIR [--records 4000] [--seed 0]
"""

import sys

from mpo_dist.cli import run_main, tool_parser
from mpo_dist.data.toy_task import write_toy_task
from mpo_dist.errors import InputError


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--out", required=True, help="folder for the records, the model and its tokenizer")
    parser.add_argument("--records", type=int, default=4000, help="preference records to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the records and the model's initialisation")
    args = parser.parse_args(argv)

    def body(info):
        if args.records < 1:
            raise InputError(f"--records must be >= 1, got {args.records}")
        pairs, tokenizer = write_toy_task(args.out, args.records, args.seed)
        print(f"make_toy_data: {args.records} records in {pairs}; model and tokenizer in {tokenizer}")

    return run_main("make_toy_data", body)


if __name__ == "__main__":
    sys.exit(main())
