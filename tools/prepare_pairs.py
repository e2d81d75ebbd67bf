"""Turn a preference dataset (JSONL, HH-RLHF dialogues, Parquet; plain or gzip) into pairs shards.

    python tools/prepare_pairs.py --input FILE --tokenizer DIR --out DIR [--samples-per-shard N]
        [--max-length N] [--max-prompt-length N] [--format auto|jsonl|hh|parquet] [--eval-fraction F]

With --eval-fraction F > 0, OUT gets two pairs shard sets, OUT/train and OUT/eval (held out): a
record goes to eval when a stable hash of its prompt text falls below F, so all pairs of one prompt
are on the same side and the split does not depend on --samples-per-shard or the process count.

Runs the same under `torchrun --nproc-per-node K` (each process writes its share of shards; the
output does not depend on K). A rerun after a crash skips the shards already written.
"""

import sys

from mpo_dist.cli import add_threads_flag, run_main, tool_parser
from mpo_dist.producers.prepare import PROMPT_LENGTH_CAP, PrepareOptions, prepare_pairs
from mpo_dist.data.raw_records import FORMATS


def main(argv=None) -> int:
    defaults = PrepareOptions()
    parser = tool_parser(__doc__)
    parser.add_argument("--input", required=True, help="JSONL / JSONL.gz / Parquet file of preference records")
    parser.add_argument("--tokenizer", required=True, help="local tokenizer folder (the policy's tokenizer)")
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json and the report")
    parser.add_argument("--format", default=defaults.format, choices=FORMATS,
                        help="jsonl: prompt/chosen/rejected[/label]; hh: chosen/rejected dialogues split at the last "
                             "'\\n\\nAssistant:'; auto: from the file name and first record")
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard,
                        help="input records per shard (a shard holds those of them that are kept)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="max prompt + response tokens")
    parser.add_argument("--max-prompt-length", type=int, default=None,
                        help=f"max prompt tokens, longer prompts keep their end (default: {PROMPT_LENGTH_CAP}, or half "
                             "of a smaller --max-length)")
    parser.add_argument("--truncation", default=defaults.truncation, choices=["truncate", "drop"],
                        help="what to do with records over the limits")
    parser.add_argument("--chat-template", action="store_true", help="render prompts with the tokenizer's chat template")
    parser.add_argument("--no-eos", dest="append_eos", action="store_false", help="do not end responses with EOS")
    parser.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                        help="hold out about this fraction of prompts (0 <= F < 1; split by a hash of the prompt "
                             "text) in OUT/eval, the rest in OUT/train; 0: no split, shards directly in OUT")
    parser.add_argument("--strict", action="store_true", help="stop at the first record that cannot be kept")
    add_threads_flag(parser)
    args = parser.parse_args(argv)
    options = PrepareOptions(
        samples_per_shard=args.samples_per_shard, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
        truncation=args.truncation, chat_template=args.chat_template, append_eos=args.append_eos,
        strict=args.strict, format=args.format, eval_fraction=args.eval_fraction,
    )
    # gloo: this is CPU work; the process group only provides the barriers.
    return run_main("prepare_pairs", lambda info: prepare_pairs(args.input, args.tokenizer, args.out, options, info.rank,
                                                                info.world_size), backend="gloo", threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
