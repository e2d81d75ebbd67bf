"""Import D_ref responses sampled by another engine (vLLM, SGLang, TGI, ...) as standard D_ref shards.

    python tools/import_dref.py --model DIR --pairs DIR --responses FILE.jsonl --out DIR
        [--batch-size 16] [--dtype auto|float32|bfloat16]

FILE.jsonl has one line per response: {"key": PAIR_KEY, "response": TEXT} or {"key": PAIR_KEY,
"response_ids": [TOKEN IDS]}, optionally with "stop_reason": "eos" | "length". The k-th line of a
key becomes sample KEY-sk, and every pair needs the same number of lines (K). Text is tokenized with
the pairs' tokenizer (that of --model, which must have made the pairs), without special tokens; a
text that ended at a stop token ("stop_reason": "eos") gets the model's first stop id appended. The
reference model (--model) re-scores logp_ref with the trainer's code, as tools/sample_reference.py
does, so the shards and manifest are those sample_reference writes. Runs the same under torchrun;
a rerun skips finished shards.
"""

import sys
from pathlib import Path

from mpo_dist.cli import add_progress_flag, add_threads_flag, run_main, tool_parser
from mpo_dist.compute_dtype import DTYPE_CHOICES, DTYPE_HELP
from mpo_dist.inference_model import MODEL_SHARDS_HELP
from mpo_dist.producers.score import open_reference
from mpo_dist.producers.import_dref import import_dref, read_external_responses
from mpo_dist.producers.job import check_batch_size
from mpo_dist.tokenizer import load_tokenizer


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--model", required=True, help="reference model: a local Hugging Face folder")
    parser.add_argument("--pairs", required=True, help="pairs shards whose prompts the responses answer")
    parser.add_argument("--responses", required=True, help="JSONL of responses made by the other engine")
    parser.add_argument("--out", required=True, help="output folder for D_ref shards")
    parser.add_argument("--batch-size", type=int, default=16, help="samples re-scored per forward")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--model-shards", type=int, default=0, help=MODEL_SHARDS_HELP)
    add_threads_flag(parser)
    add_progress_flag(parser)
    args = parser.parse_args(argv)

    def body(info):
        check_batch_size(args.batch_size)  # before the model is loaded
        reference = open_reference(args.model, args.pairs, args.dtype, info, tool="import_dref",
                                   model_shards=args.model_shards)
        responses = read_external_responses(args.responses, args.pairs, load_tokenizer(args.model),
                                            reference.eos_token_ids, reference.model.config.vocab_size)
        import_dref(reference.model, args.pairs, args.out, responses, pad_token_id=reference.pad_token_id,
                    rank=info.rank, world_size=info.world_size, batch_size=args.batch_size, device=reference.device,
                    model_info=reference.model_info, source=str(Path(args.responses).resolve()))

    return run_main("import_dref", body, threads=args.threads, progress=args.progress)


if __name__ == "__main__":
    sys.exit(main())
