"""Evaluate a model (a Hugging Face folder or a training checkpoint) on held-out data and on its own samples.

    python tools/evaluate.py --model DIR --out REPORT.json [--model DIR2 --out REPORT2.json ...]
        [--pairs DIR --reference DIR] [--dref DIR] [--loss mpo|dpo|ipo --beta B] [--per-sample]
        [--on-policy-samples K --max-new-tokens N --reference-model DIR [--temperature 1 --top-p 1 --seed 0]
         [--max-prompts P] [--reward module:function]]

Offline: the trainer's held-out metrics (`eval/...`) on pairs + their reference log-probs and on a
held-out D_ref (`eval/kl_ref_policy`, KL(pi_ref || pi_theta)). On-policy: K responses per prompt of
--pairs sampled from the model, scored under it and under --reference-model: `on_policy/kl_policy_ref`
(KL(pi_theta || pi_ref), at temperature 1 and top-p 1) and, with --reward, `on_policy/reward`, each
with its standard error. The same under `torchrun --nnodes N --nproc-per-node K ...`: the ranks
share the samples and the report does not depend on their number. Rank 0 writes the JSON report.
Several --model, each with its --out (in order), are evaluated one after the other in one process,
with the same data and options (the checkpoints along a run: the process start-up is paid once).
For a training checkpoint the loss and its options are the run's (OUTPUT_DIR/config.yaml); --loss,
--beta and --label-smoothing override them, and options the chosen loss does not take are dropped.
"""

import gc
import sys

from mpo_dist.cli import add_progress_flag, add_threads_flag, run_main, tool_parser
from mpo_dist.compute_dtype import DTYPE_CHOICES, DTYPE_HELP
from mpo_dist.config import LossConfig
from mpo_dist.distributed import device_for
from mpo_dist.inference_model import MODEL_SHARDS_HELP
from mpo_dist.evaluate_model import (EvaluationRequest, evaluate_model, evaluation_loss_config, is_checkpoint,
                                     run_loss_config)
from mpo_dist.losses import LOSSES
from mpo_dist.producers.sample import SamplingParams


def main(argv=None) -> int:
    sampling, loss = SamplingParams(), LossConfig()
    parser = tool_parser(__doc__)
    parser.add_argument("--model", required=True, action="append",
                        help="the model evaluated: a Hugging Face folder, or a training checkpoint folder "
                             "(OUTPUT_DIR/checkpoints/step-XXXXXXXX, converted on the fly); repeat for several")
    parser.add_argument("--out", required=True, action="append",
                        help="the JSON report (written by rank 0, atomically); one per --model, in order")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--pairs", default=None, help="held-out pairs shards (offline metrics with --reference; "
                                                    "the prompts of on-policy evaluation)")
    parser.add_argument("--reference", default=None, help="reference log-prob shards of --pairs")
    parser.add_argument("--dref", default=None, help="held-out D_ref shards (the KL monitor eval/kl_ref_policy)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs, D_ref samples or sampled responses per batch")
    parser.add_argument("--loss", default=None, choices=sorted(LOSSES),
                        help=f"loss whose metrics are reported; default: the run's loss.name beside a checkpoint, "
                             f"else {loss.name}")
    parser.add_argument("--beta", type=float, default=None,
                        help=f"the loss's beta; default: the run's loss.beta beside a checkpoint, else {loss.beta}")
    parser.add_argument("--label-smoothing", type=float, default=None,
                        help="DPO label smoothing; default: the run's beside a checkpoint, else 0")
    parser.add_argument("--per-sample", action="store_true", help="add every sample's log-probs (with its key) to the report")
    parser.add_argument("--on-policy-samples", type=int, default=0, help="responses sampled per prompt (K); 0: no on-policy evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=sampling.max_new_tokens, help="longest sampled response")
    parser.add_argument("--temperature", type=float, default=sampling.temperature,
                        help="sampling temperature; the KL estimate assumes 1")
    parser.add_argument("--top-p", type=float, default=sampling.top_p, help="nucleus sampling; the KL estimate assumes 1")
    parser.add_argument("--seed", type=int, default=sampling.seed, help="with the prompt key and k, seeds each sample")
    parser.add_argument("--max-prompts", type=int, default=0, help="on-policy prompts: those of the first P records of --pairs (0: all)")
    parser.add_argument("--reference-model", default=None, help="the reference model (Hugging Face folder) for on-policy KL")
    parser.add_argument("--reward", default=None, help="module:function scoring (prompt_text, response_text) -> float; "
                                                     "text decoded with the tokenizer beside --model")
    parser.add_argument("--model-shards", type=int, default=0, help=MODEL_SHARDS_HELP)
    add_threads_flag(parser)
    add_progress_flag(parser)
    args = parser.parse_args(argv)
    if len(args.model) != len(args.out):
        parser.error(f"give one --out per --model: {len(args.model)} --model, {len(args.out)} --out")
    if len(set(args.out)) != len(args.out):
        parser.error("two --model would write the same --out")

    def body(info):
        on_policy = None
        if args.on_policy_samples:
            on_policy = SamplingParams(args.on_policy_samples, args.max_new_tokens, args.temperature, args.top_p, args.seed)
        for model, out in zip(args.model, args.out):
            base = (run_loss_config(model) if is_checkpoint(model) else None) or LossConfig()
            # The run's loss options, less those the chosen loss does not take (tau with --loss dpo, ...).
            loss_config = evaluation_loss_config(base, args.loss, args.beta, args.label_smoothing)
            request = EvaluationRequest(model=model, dtype=args.dtype, pairs=args.pairs or "",
                                        reference=args.reference or "", dref=args.dref or "", batch_size=args.batch_size,
                                        loss=loss_config, per_sample=args.per_sample, on_policy=on_policy,
                                        reference_model=args.reference_model or "", reward=args.reward or "",
                                        max_prompts=args.max_prompts, model_shards=args.model_shards)
            evaluate_model(request, info, device_for(info), out)
            gc.collect()  # the models of this report, before the next ones load

    return run_main("evaluate", body, threads=args.threads, progress=args.progress)


if __name__ == "__main__":
    sys.exit(main())
