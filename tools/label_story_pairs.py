"""Preference pairs with a known reward: reference samples of story openings, labelled by Bradley-Terry.

    python tools/label_story_pairs.py --pairs PROMPT_PAIRS --samples SAMPLES --tokenizer MODEL --out pairs.jsonl
        [--labels sampled|soft] [--lengths fixed|varied] [--seed 0] [--report report.json]

--pairs are the prompt shards (tools/make_story_prompts.py, then tools/prepare_pairs.py) and
--samples the reference samples of their prompts (tools/sample_reference.py --num-samples 2P). Each
sample is decoded as tools/evaluate.py decodes responses, scored with the true reward
(mpo_dist.study.story_reward.reward), and the samples of a prompt are taken two at a time into P pairs,
labelled by Bradley-Terry on the reward: `sampled` draws a hard label with probability
sigmoid(r_a - r_b), seeded per pair; `soft` keeps the better response as chosen with that
probability as `label`. `--lengths varied` first cuts each sample to a random number of its tokens
(uniform from a quarter of them to all, seeded per sample), so chosen and rejected differ in length.
The output is pairs JSONL for tools/prepare_pairs.py; --report gets the
measured reward spread (within-prompt standard deviation, mean pair difference, ties, label noise).
tools/study_frontier.py runs the whole chain.
"""

import json
import sys
from pathlib import Path

from mpo_dist.cli import run_main, tool_parser
from mpo_dist.study.story_task import LABEL_MODES, LENGTH_MODES, label_pairs, write_jsonl
from mpo_dist.tokenizer import load_tokenizer


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--pairs", required=True, help="the prompts' pairs shards")
    parser.add_argument("--samples", required=True, help="reference samples of those prompts (tools/sample_reference.py)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder that decodes the samples (the model's)")
    parser.add_argument("--out", required=True, help="pairs JSONL for tools/prepare_pairs.py")
    parser.add_argument("--labels", default="sampled", choices=LABEL_MODES,
                        help="sampled: hard Bradley-Terry draws; soft: label = P(chosen preferred)")
    parser.add_argument("--lengths", default="fixed", choices=LENGTH_MODES,
                        help="fixed: the samples as drawn; varied: each cut to a random length (seeded per sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled labels and of the varied lengths")
    parser.add_argument("--report", default=None, help="JSON file for the reward spread statistics")
    args = parser.parse_args(argv)

    def body(info):
        records, stats = label_pairs(args.pairs, args.samples, load_tokenizer(args.tokenizer), seed=args.seed,
                                     labels=args.labels, lengths=args.lengths)
        write_jsonl(args.out, records)
        if args.report:  # after the pairs, atomically: a report means the pairs are complete
            report = Path(args.report)
            report.with_name(report.name + ".tmp").write_text(json.dumps(stats, indent=1) + "\n")
            report.with_name(report.name + ".tmp").replace(report)
        print(f"label_story_pairs: {stats['pairs']} pairs of {stats['prompts']} prompts -> {args.out} ({args.labels} "
              f"labels, {args.lengths} lengths); reward mean {stats['reward_mean']:.3f}, within-prompt std {stats['within_prompt_std']:.3f}, "
              f"mean |r_a - r_b| {stats['mean_abs_pair_difference']:.3f}, ties {stats['tied_pairs']:.2f}, "
              f"chosen better in {stats['chosen_has_higher_reward']:.2f} of untied pairs")

    return run_main("label_story_pairs", body)


if __name__ == "__main__":
    sys.exit(main())
