"""Write the quickstart's toy preference task (digit sorting) and a tiny random-init model with its tokenizer.

    python tools/make_toy_data.py --out DIR [--records 4000] [--seed 0]
"""

import argparse

from mpo_dist.data.toy_task import write_toy_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pairs, tokenizer = write_toy_task(args.out, args.records, args.seed)
    print(f"make_toy_data: {args.records} records in {pairs}; model and tokenizer in {tokenizer}")


if __name__ == "__main__":
    main()
