"""Loader throughput (pairs/s in one process: tar read + decode + reference join + collate) and padding waste.

    python tools/bench_loader.py --pairs DIR [--reference DIR] [--dref DIR] [--batch-size 8]
        [--dref-batch-size 8] [--max-tokens 4096] [--epochs 3]

Runs fixed-size batches and token-budget batches over the same shards in one process
(num_workers=0, so the figure is per process; a DataLoader worker adds one such process), and
with --dref the D_ref stream for --epochs passes over its samples. `load ms` is the time a rank
waits for one micro-batch when it loads it itself (data.num_workers=0): the part a worker could take
over. `layout ms` lays the batch out for the forward (data/layout.py, padded rows by default), which
the rank does in any case. Compare their sum with the step time (tokens per step divided by
throughput/tokens_per_s in metrics.jsonl).
"""

import itertools
import sys
import time

from mpo_dist.cli import run_main, tool_parser
from mpo_dist.config import DataConfig
from mpo_dist.batch import documents
from mpo_dist.data.layout import layout_for
from mpo_dist.data.loader import build_dref_loader, build_pair_loader


def measure(batches, layout, documents) -> dict:
    """Samples/s, time per batch (loading, layout) and padding of an iterable of collated batches."""
    samples = count = real = padded = 0
    load = arrange = 0.0
    batches = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        load += time.perf_counter() - start
        if batch is None:
            break
        start = time.perf_counter()
        model_input = layout(documents(batch))
        arrange += time.perf_counter() - start
        count += 1
        samples += int((~batch["is_pad"]).sum())
        real += model_input.num_real_positions
        padded += model_input.input_ids.numel()
    return {"per_s": samples / load, "load_ms": 1000 * load / count, "layout_ms": 1000 * arrange / count,
            "batches": count, "samples": samples, "padding": 1 - real / padded}


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--pairs", required=True, help="pairs shards")
    parser.add_argument("--reference", default="", help="reference log-prob shards to join (empty: none)")
    parser.add_argument("--dref", default="", help="D_ref shards to time as well (empty: none)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch of the fixed-size run")
    parser.add_argument("--dref-batch-size", type=int, default=8, help="D_ref samples per batch")
    parser.add_argument("--max-tokens", type=int, default=4096, help="budget of the token-budget run")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the shards per run")
    args = parser.parse_args(argv)
    return run_main("bench_loader", lambda info: bench(args))


def bench(args) -> None:
    fixed = DataConfig(pairs=args.pairs, reference=args.reference, dref=args.dref, num_workers=0,
                       batch_size=args.batch_size, dref_batch_size=args.dref_batch_size)
    runs = {
        f"fixed, {args.batch_size} pairs": fixed,
        f"tokens, {args.max_tokens} padded tokens": DataConfig(**{**vars(fixed), "batching": "tokens",
                                                                   "max_tokens": args.max_tokens}),
    }
    # No model here: data.packing=auto compares the positions computed.
    layout = layout_for(fixed, pad_token_id=0, cost=lambda rows, width, dense_attention: rows * width)
    print(f"{'batching':<32} {'samples/s':>10} {'load ms':>8} {'layout ms':>10} {'batches':>8} {'per batch':>10} {'padding':>8}")
    for name, data in runs.items():
        loader = build_pair_loader(data, seed=0, dp_rank=0, dp_world_size=1, num_epochs=args.epochs)
        report(name, measure(loader, layout, documents))
    if args.dref:
        loader = build_dref_loader(fixed, seed=0, dp_rank=0, dp_world_size=1)
        batches = args.epochs * -(-loader.manifest.num_samples // args.dref_batch_size)  # it cycles: stop after --epochs
        report(f"D_ref, {args.dref_batch_size} samples",
               measure(itertools.islice(loader, batches), layout, lambda batch: documents(None, batch)))


def report(name: str, result: dict) -> None:
    print(f"{name:<32} {result['per_s']:>10,.0f} {result['load_ms']:>8.2f} {result['layout_ms']:>10.2f} "
          f"{result['batches']:>8} {result['samples'] / result['batches']:>10.1f} {result['padding']:>8.1%}")


if __name__ == "__main__":
    sys.exit(main())
