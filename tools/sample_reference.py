"""Sample D_ref (MPO's regularisation samples) from the reference model for the prompts of pairs shards.

    python tools/sample_reference.py --model DIR --pairs DIR --out DIR --num-samples K --max-new-tokens N
        [--temperature 1.0] [--top-p 1.0] [--seed 0] [--batch-size 16] [--dtype float32|bfloat16]

The same under `torchrun --nnodes N --nproc-per-node K ...`. Every sample is seeded from the seed,
its prompt's key and its index, so the output is identical whatever the number of processes or
nodes; a rerun skips finished shards.
"""

import argparse
import sys
from pathlib import Path

import torch

from mpo_dist.data.shards import Manifest
from mpo_dist.distributed import barrier
from mpo_dist.reference import load_reference_model, weights_fingerprint
from mpo_dist.sampling import SamplingParams, sample_dref
from mpo_dist.shard_job import run_tool


def main(argv=None) -> int:
    defaults = SamplingParams()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="reference model: a local Hugging Face folder")
    parser.add_argument("--pairs", required=True, help="pairs shards whose prompts are sampled")
    parser.add_argument("--out", required=True, help="output folder for D_ref shards")
    parser.add_argument("--num-samples", type=int, required=True, help="responses per prompt (K)")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="1 samples pi_ref itself (what MPO assumes); 0 is greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences generated together")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    params = SamplingParams(args.num_samples, args.max_new_tokens, args.temperature, args.top_p, args.seed)

    def body(info):
        params.validate()
        device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        pairs = Manifest.read(args.pairs, "pairs")
        model = load_reference_model(args.model, pairs, Path(args.pairs), args.dtype, device)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        if eos is None:
            eos = model.config.eos_token_id  # generation config lists every stop token (e.g. end of turn)
        pad = pairs.info.get("tokenizer", {}).get("pad_token_id") or 0
        model_info = {"model": {"path": str(Path(args.model).resolve()), "dtype": args.dtype,
                                "weights_hash": weights_fingerprint(args.model) if info.is_main else None}}
        sample_dref(model, args.pairs, args.out, params, eos_token_ids=eos, pad_token_id=pad, rank=info.rank,
                    world_size=info.world_size, batch_size=args.batch_size, device=device, model_info=model_info,
                    barrier=barrier)

    return run_tool("sample_reference", body)


if __name__ == "__main__":
    sys.exit(main())
