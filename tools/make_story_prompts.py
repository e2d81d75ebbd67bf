"""Story openings as prompt records: the first step of the frontier study's task with a known reward.

    python tools/make_story_prompts.py --out prompts.jsonl [--num-prompts 400]

One JSONL record per opening (`mpo_dist.study.story_task`: templates x character names) with placeholder
responses, for tools/prepare_pairs.py; tools/sample_reference.py --num-samples 2P on those shards
then draws 2P reference continuations per opening, and tools/label_story_pairs.py makes them into P
labelled pairs per opening. tools/study_frontier.py runs the whole chain.
"""

import sys

from mpo_dist.cli import run_main, tool_parser
from mpo_dist.study.story_task import NAMES, TEMPLATES, story_prompts, write_prompt_records


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--out", required=True, help="JSONL file of prompt records")
    parser.add_argument("--num-prompts", type=int, default=len(TEMPLATES) * len(NAMES),
                        help="distinct openings (templates x names; the default is all of them)")
    args = parser.parse_args(argv)

    def body(info):
        path = write_prompt_records(args.out, story_prompts(args.num_prompts))
        print(f"make_story_prompts: {args.num_prompts} story openings -> {path}")

    return run_main("make_story_prompts", body)


if __name__ == "__main__":
    sys.exit(main())
