"""Turn a preference dataset (JSONL, HH-RLHF dialogues, Parquet, a Hugging Face datasets folder; plain
or gzip) into pairs shards.

    python tools/prepare_pairs.py --input FILE|DIR --tokenizer DIR --out DIR [--samples-per-shard N]
        [--max-length N] [--max-prompt-length N] [--format auto|jsonl|hh|parquet|datasets] [--split NAME]
        [--columns prompt=COL,chosen=COL,rejected=COL] [--eval-fraction F]

Records whose chosen/rejected are conversations (lists of {role, content} messages) are split at
the messages the two share and rendered with the tokenizer's chat template, checked to match the
template's rendering of the whole conversation; a record that does not is reported with the reason.

With --eval-fraction F > 0, OUT gets two pairs shard sets, OUT/train and OUT/eval (held out): a
record goes to eval when a stable hash of its prompt text falls below F, so all pairs of one prompt
are on the same side and the split does not depend on --samples-per-shard or the process count.

Runs the same under `torchrun --nproc-per-node K` (each process writes its share of shards; the
output does not depend on K). A rerun after a crash skips the shards already written.
"""

import sys

from mpo_dist.cli import add_progress_flag, add_threads_flag, run_main, tool_parser
from mpo_dist.producers.prepare import PROMPT_LENGTH_CAP, PrepareOptions, prepare_pairs
from mpo_dist.data.raw_records import FIELDS, FORMATS, parse_columns


def main(argv=None) -> int:
    defaults = PrepareOptions()
    parser = tool_parser(__doc__)
    parser.add_argument("--input", required=True, help="JSONL / JSONL.gz / Parquet file of preference records, or a "
                             "datasets folder (save_to_disk; needs pip install 'mpo_dist[datasets]')")
    parser.add_argument("--tokenizer", required=True, help="local tokenizer folder (the policy's tokenizer)")
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json and the report")
    parser.add_argument("--format", default=defaults.format, choices=FORMATS,
                        help="jsonl: prompt/chosen/rejected[/label]; hh: chosen/rejected dialogues split at the last "
                             "'\\n\\nAssistant:'; parquet: either; datasets: a save_to_disk folder; auto: from the "
                             "file name, folder and first record")
    parser.add_argument("--split", default=None,
                        help="the split to read from a datasets folder that holds several (a DatasetDict)")
    parser.add_argument("--columns", default=None,
                        help=f"the input's names for the fields {'/'.join(FIELDS)} where they differ, e.g. "
                             "prompt=question,chosen=pos,rejected=neg")
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard,
                        help="input records per shard (a shard holds those of them that are kept)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="max prompt + response tokens")
    parser.add_argument("--max-prompt-length", type=int, default=None,
                        help=f"max prompt tokens, longer prompts keep their end (default: {PROMPT_LENGTH_CAP}, or half "
                             "of a smaller --max-length)")
    parser.add_argument("--truncation", default=defaults.truncation, choices=["truncate", "drop"],
                        help="what to do with records over the limits")
    parser.add_argument("--chat-template", action="store_true",
                        help="render text and message prompts with the tokenizer's chat template (conversations, "
                             "chosen/rejected as message lists, always are)")
    parser.add_argument("--no-eos", dest="append_eos", action="store_false", help="do not end responses with EOS")
    parser.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                        help="hold out about this fraction of prompts (0 <= F < 1; split by a hash of the prompt "
                             "text) in OUT/eval, the rest in OUT/train; 0: no split, shards directly in OUT")
    parser.add_argument("--strict", action="store_true", help="stop at the first record that cannot be kept")
    add_threads_flag(parser)
    add_progress_flag(parser)
    args = parser.parse_args(argv)

    def prepare(info) -> None:
        options = PrepareOptions(  # here, so that a bad --columns is one line of run_main's
            samples_per_shard=args.samples_per_shard, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, truncation=args.truncation, chat_template=args.chat_template,
            append_eos=args.append_eos, strict=args.strict, format=args.format, eval_fraction=args.eval_fraction,
            columns=parse_columns(args.columns) if args.columns is not None else {}, split=args.split,
        )
        prepare_pairs(args.input, args.tokenizer, args.out, options, info.rank, info.world_size)

    # gloo: this is CPU work; the process group only provides the barriers.
    return run_main("prepare_pairs", prepare, backend="gloo", threads=args.threads, progress=args.progress)


if __name__ == "__main__":
    sys.exit(main())
