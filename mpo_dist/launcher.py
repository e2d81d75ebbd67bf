"""torchrun, with input errors passed through: `python -m mpo_dist.launcher [torchrun options] -m mpo_dist.train ...`.

Takes exactly torchrun's options. When the workers stopped on an input error (some exited with
code 2 after printing one line each saying what to change, the others exited 2 too or were
stopped by torchrun's signal), the launcher exits 2 itself instead of adding torchrun's
multi-screen `ChildFailedError` report. Any other failure is reported by torchrun as usual. The launch scripts and the container entrypoint use it.

Preemption: the launcher has torchrun forward SIGTERM and SIGUSR1 (among others) to the ranks and
wait up to `--shutdown-timeout` (default DEFAULT_GRACE_S) for them to save the step in progress;
then it exits 143 (128 + SIGTERM), whichever signal came, so a scheduler can tell a stopped run from
a failed one (exit 1) and an input error (exit 2).

`launch_command` and `train_command` build its command line for the tools and tests that start a run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from mpo_dist import preemption
from mpo_dist.errors import INPUT_ERROR_EXIT_CODE, TERMINATED_EXIT_CODE


def launch_command(nproc: int, target: Sequence[str]) -> list[str]:
    """`python -m mpo_dist.launcher --standalone --nproc-per-node NPROC TARGET...` (TARGET: a script
    and its arguments, or `-m module ...`), with this Python."""
    return [sys.executable, "-m", "mpo_dist.launcher", "--standalone", "--nproc-per-node", str(nproc), *map(str, target)]


def train_command(config: str | Path, overrides: Sequence[str], nproc: int = 1) -> list[str]:
    """The trainer on NPROC processes: `launch_command(nproc, -m mpo_dist.train --config CONFIG OVERRIDES...)`."""
    return launch_command(nproc, ["-m", "mpo_dist.train", "--config", str(config), *overrides])


# torchrun forwards these to the ranks (its default lacks SIGUSR1, which SLURM's --signal sends ahead
# of a time limit); the trainer saves the step in progress on job.preempt_signals (preemption.py).
FORWARDED_SIGNALS = ",".join(preemption.FORWARDED_SIGNALS)
# Seconds torchrun waits, after forwarding a signal, for the ranks to finish their step and save it
# before it kills them (torchrun's own default, 30 s, is shorter than a large model's save). The
# scheduler's grace period bounds it too (SLURM's --signal lead time or KillWait, Kubernetes'
# terminationGracePeriodSeconds): set both above the save time that the trainer logs.
DEFAULT_GRACE_S = 600


def _with_defaults(argv: list[str]) -> list[str]:
    """torchrun's arguments, with this project's defaults for the signal options that neither the
    command line (before the script) nor torchrun's environment variables set."""
    from torch.distributed.run import parse_args

    script_and_args = 1 + len(parse_args(argv).training_script_args)
    options = argv[:len(argv) - script_and_args]  # a flag among the script's own arguments is the script's

    def given(*flags: str, variables: tuple[str, ...]) -> bool:
        return any(arg.split("=")[0] in flags for arg in options) or any(os.environ.get(name) for name in variables)

    defaults = []
    if not given("--signals-to-handle", "--signals_to_handle", variables=("PET_SIGNALS_TO_HANDLE",)):
        defaults += ["--signals-to-handle", FORWARDED_SIGNALS]
    if not given("--shutdown-timeout", "--shutdown_timeout",
                 variables=("PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")):
        defaults += ["--shutdown-timeout", str(DEFAULT_GRACE_S)]
    return defaults + argv


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import parse_args, run

    args = parse_args(_with_defaults(list(sys.argv[1:] if argv is None else argv)))
    # A fresh store for the workers of every rendezvous round (rank 0's), as before torch 2.4. With the
    # agents' shared store (torch 2.13's default) a node that comes back after a loss waits for a
    # MASTER_ADDR that the surviving rank-0 agent wrote only for the first round, and both time out.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(args)
    except SignalException as stopped:
        # The ranks got the signal too and left after their cleanup (a checkpoint of the step in
        # progress when they were training); torchrun itself only reports its own signal.
        print(f"mpo_dist.launcher: stopped by {stopped.sigval.name}; the ranks' last lines say what was saved",
              file=sys.stderr, flush=True)
        # 143 for the preemption signals (the ranks saved the step in progress: requeue), else the
        # shell's 128 + signal number (130 for Ctrl-C, which saves nothing).
        return TERMINATED_EXIT_CODE if stopped.sigval.name in preemption.DEFAULT_SIGNALS else 128 + stopped.sigval
    except ChildFailedError as failed:
        codes = {failure.exitcode for failure in failed.failures.values()}
        # A negative code is a signal, and TERMINATED_EXIT_CODE a rank that left through its cleanup on
        # SIGTERM: torchrun stopping the ranks left once one had exited.
        stopped = lambda code: code < 0 or code == TERMINATED_EXIT_CODE  # noqa: E731
        if INPUT_ERROR_EXIT_CODE in codes and all(code == INPUT_ERROR_EXIT_CODE or stopped(code) for code in codes):
            return INPUT_ERROR_EXIT_CODE
        raise
    except RendezvousTimeoutError:
        # Not all nodes joined within the c10d join_timeout (launch/multi_node.sh's RDZV_JOIN_TIMEOUT):
        # at the start, or after a failure when a lost node did not come back. One line, exit 1.
        conf = dict(item.split("=", 1) for item in args.rdzv_conf.split(",") if "=" in item)
        print(f"mpo_dist.launcher: the rendezvous at {args.rdzv_endpoint} did not gather {args.nnodes} nodes within "
              f"{conf.get('join_timeout', 600)} s (a node was lost and did not return, or never started); the newest "
              "checkpoint under job.output_dir/checkpoints is kept; restart the job when the nodes are back",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
