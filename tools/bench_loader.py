"""Loader throughput (pairs/s in one process: tar read + decode + reference join + collate) and padding waste.

    python tools/bench_loader.py --pairs DIR [--reference DIR] [--batch-size 8] [--max-tokens 4096] [--epochs 3]

Runs fixed-size batches and token-budget batches over the same shards in one process
(num_workers=0, so the figure is per process; a DataLoader worker adds one such process).
"""

import sys
import time

from mpo_dist.cli import run_main, tool_parser
from mpo_dist.config import DataConfig
from mpo_dist.data.loader import build_pair_loader


def measure(data: DataConfig, epochs: int) -> dict:
    loader = build_pair_loader(data, seed=0, dp_rank=0, dp_world_size=1, pad_token_id=0, num_epochs=epochs)
    pairs = real = padded = batches = 0
    start = time.perf_counter()
    for batch in loader:
        batches += 1
        pairs += int((~batch["is_pad"]).sum())
        real += batch["num_tokens"]
        padded += batch["num_padded_tokens"]
    seconds = time.perf_counter() - start
    return {"pairs_per_s": pairs / seconds, "batches": batches, "pairs": pairs, "padding": 1 - real / padded}


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--pairs", required=True, help="pairs shards")
    parser.add_argument("--reference", default="", help="reference log-prob shards to join (empty: none)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch of the fixed-size run")
    parser.add_argument("--max-tokens", type=int, default=4096, help="budget of the token-budget run")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the shards per run")
    args = parser.parse_args(argv)
    return run_main("bench_loader", lambda info: bench(args))


def bench(args) -> None:
    common = dict(pairs=args.pairs, reference=args.reference, num_workers=0, batch_size=args.batch_size)
    runs = {
        f"fixed, {args.batch_size} pairs": DataConfig(**common),
        f"tokens, {args.max_tokens} padded tokens": DataConfig(**common, batching="tokens", max_tokens=args.max_tokens),
    }
    print(f"{'batching':<32} {'pairs/s':>9} {'batches':>8} {'pairs/batch':>12} {'padding':>8}")
    for name, data in runs.items():
        result = measure(data, args.epochs)
        print(f"{name:<32} {result['pairs_per_s']:>9,.0f} {result['batches']:>8} "
              f"{result['pairs'] / result['batches']:>12.1f} {result['padding']:>8.1%}")


if __name__ == "__main__":
    sys.exit(main())
