"""Sample D_ref (MPO's regularisation samples) from the reference model for the prompts of pairs shards.

    python tools/sample_reference.py --model DIR --pairs DIR --out DIR --num-samples K --max-new-tokens N
        [--temperature 1.0] [--top-p 1.0] [--seed 0] [--batch-size 16] [--dtype auto|float32|bfloat16]

The same under `torchrun --nnodes N --nproc-per-node K ...`. Every sample is seeded from the seed,
its prompt's key and its index, so the output is identical whatever the number of processes or
nodes; a rerun skips finished shards.
"""

import sys

from mpo_dist.cli import add_progress_flag, add_threads_flag, run_main, tool_parser
from mpo_dist.compute_dtype import DTYPE_CHOICES, DTYPE_HELP
from mpo_dist.inference_model import MODEL_SHARDS_HELP
from mpo_dist.producers.score import open_reference
from mpo_dist.producers.sample import SamplingParams, sample_dref
from mpo_dist.producers.job import check_batch_size


def main(argv=None) -> int:
    defaults = SamplingParams()
    parser = tool_parser(__doc__)
    parser.add_argument("--model", required=True, help="reference model: a local Hugging Face folder")
    parser.add_argument("--pairs", required=True, help="pairs shards whose prompts are sampled")
    parser.add_argument("--out", required=True, help="output folder for D_ref shards")
    parser.add_argument("--num-samples", type=int, required=True, help="responses per prompt (K)")
    parser.add_argument("--max-new-tokens", type=int, required=True, help="longest response")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="1 samples pi_ref itself (what MPO assumes); 0 is greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling; 1 samples pi_ref itself")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="with the prompt key and k, seeds each sample")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences generated together")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--model-shards", type=int, default=0, help=MODEL_SHARDS_HELP)
    add_threads_flag(parser)
    add_progress_flag(parser)
    args = parser.parse_args(argv)
    params = SamplingParams(args.num_samples, args.max_new_tokens, args.temperature, args.top_p, args.seed)

    def body(info):
        params.validate()  # before the model is loaded
        check_batch_size(args.batch_size)
        reference = open_reference(args.model, args.pairs, args.dtype, info, tool="sample_reference",
                                   model_shards=args.model_shards)
        sample_dref(reference.model, args.pairs, args.out, params, eos_token_ids=reference.eos_token_ids,
                    pad_token_id=reference.pad_token_id, rank=info.rank, world_size=info.world_size,
                    batch_size=args.batch_size, device=reference.device, model_info=reference.model_info)

    return run_main("sample_reference", body, threads=args.threads, progress=args.progress)


if __name__ == "__main__":
    sys.exit(main())
