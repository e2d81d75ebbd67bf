"""Cost of the pre-flight shard check on a synthetic pairs + reference (+ D_ref) set.

    python tools/bench_preflight.py [--pairs 100000] [--samples-per-shard 1000] [--dref-per-pair 0]
        [--world-size 1] [--dir DIR]

Writes the shards with the library's own writers (ShardWriter, write_reference_shard) in a temp
folder (or --dir, kept), then times `preflight_check` as rank 0 of --world-size (each rank checks
its share of the shards; the ranks run in parallel, so this is the wall time of the whole check).
Token lengths are drawn like a chat preference set: prompts 16-384 tokens, responses 8-320.
The files were just written, so they are read from the page cache: on cold storage add the
bytes printed divided by the storage's read rate.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mpo_dist.cli import tool_parser
from mpo_dist.data.preflight import preflight_check
from mpo_dist.data.samples import write_reference_shard
from mpo_dist.data.shards import Manifest, ShardInfo, ShardWriter, shard_name

VOCAB = 50257


def make_set(root: Path, num_pairs: int, per_shard: int, dref_per_pair: int, seed: int = 0) -> int:
    """Pairs, reference and optionally D_ref shards under `root`; returns the bytes written."""
    rng = np.random.default_rng(seed)
    for name in ("pairs", "ref", "dref"):
        (root / name).mkdir(parents=True, exist_ok=True)
    pairs, refs, drefs = [], [], []
    for shard, start in enumerate(range(0, num_pairs, per_shard)):
        name, count = shard_name(shard), min(per_shard, num_pairs - start)
        keys, lengths, chosen_counts, rejected_counts, dref_lengths = [], [], [], [], []
        with ShardWriter(root / "pairs" / name, "pairs") as writer:
            for index in range(start, start + count):
                prompt, chosen, rejected = (rng.integers(0, VOCAB, size=rng.integers(low, high), dtype=np.int32)
                                            for low, high in ((16, 384), (8, 320), (8, 320)))
                key = f"{index:09d}"
                writer.write(key, {"prompt": "p", "chosen": "c", "rejected": "r", "label": None, "where": f"line {index}"},
                             {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
                keys.append(key)
                lengths.append(len(prompt) + max(len(chosen), len(rejected)))
                chosen_counts.append(len(chosen))
                rejected_counts.append(len(rejected))
        logps = -rng.random((count, 2)) * 300
        write_reference_shard(root / "ref" / name, keys, logps[:, 0], logps[:, 1], chosen_counts, rejected_counts)
        if dref_per_pair:
            with ShardWriter(root / "dref" / name, "dref") as writer:
                for key in keys:
                    for k in range(dref_per_pair):
                        prompt, response = (rng.integers(0, VOCAB, size=rng.integers(low, high), dtype=np.int32)
                                            for low, high in ((16, 384), (8, 320)))
                        writer.write(f"{key}-s{k}", {"logp_ref": -float(rng.random() * 300), "stop_reason": "eos"},
                                     {"prompt_ids": prompt, "response_ids": response})
                        dref_lengths.append(len(prompt) + len(response))
            drefs.append(ShardInfo(name, count * dref_per_pair, dref_lengths))
        pairs.append(ShardInfo(name, count, lengths))
        refs.append(ShardInfo(name, count))
    Manifest("pairs", "sha256:bench", pairs, info={"tokenizer": {"vocab_size": VOCAB}}).write(root / "pairs")
    Manifest("ref_logps", "sha256:bench", refs).write(root / "ref")
    if dref_per_pair:
        Manifest("dref", "sha256:bench", drefs).write(root / "dref")
    return sum(path.stat().st_size for path in root.rglob("*.tar"))


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--pairs", type=int, default=100_000, help="pairs in the synthetic set")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="pairs per shard")
    parser.add_argument("--dref-per-pair", type=int, default=0, help="D_ref samples per prompt (0: no D_ref)")
    parser.add_argument("--world-size", type=int, default=1, help="time rank 0's share of a check over this many ranks")
    parser.add_argument("--dir", default=None, help="write (or reuse) the set here and keep it (default: a temp folder)")
    args = parser.parse_args(argv)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_preflight-"))
    try:
        if not (root / "pairs" / "manifest.json").exists():
            start = time.perf_counter()
            size = make_set(root, args.pairs, args.samples_per_shard, args.dref_per_pair)
            print(f"wrote {args.pairs:,} pairs (+ reference{', D_ref' if args.dref_per_pair else ''}), "
                  f"{size / 2**20:,.0f} MiB of shards, in {time.perf_counter() - start:.1f}s")
        size = sum(path.stat().st_size for path in root.rglob("*.tar"))
        dref = root / "dref" if (root / "dref" / "manifest.json").exists() else None
        best, best_cpu = None, None
        for _ in range(3):  # the first pass also warms the page cache when --dir was reused
            cpu = time.process_time()
            report = preflight_check(root / "pairs", root / "ref", dref, vocab_size=VOCAB, rank=0,
                                     world_size=args.world_size)
            cpu = time.process_time() - cpu
            best = report if best is None or report.seconds < best.seconds else best
            best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
        share = size / args.world_size
        print(f"pre-flight (rank 0 of {args.world_size}): {best.pairs:,} pairs, {best.records:,} records, "
              f"{best.shards} shard files, ~{share / 2**20:,.0f} MiB in {best.seconds:.2f}s wall, {best_cpu:.2f}s CPU: "
              f"{best.pairs / best.seconds:,.0f} pairs/s ({best.pairs / best_cpu:,.0f} per CPU second), "
              f"{share / 2**20 / best.seconds:,.0f} MiB/s")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
