"""`python -m pause_points_train ARGS` = `python -m mpo_dist.train ARGS`, with one pause for signal tests.

MPO_TEST_PAUSE_AT names where every rank writes MPO_TEST_MARKER.rankR and sleeps PAUSE_S seconds, so
a test can send a signal while the run is exactly there: `preflight` (the input checks before step
1), `step:N` (before step N's forward), `save:N` (inside the save of step N, before it writes),
`after_save:N` (right after step N's save), `eval:N` (inside the evaluation after step N)."""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

PAUSE_S = 3.0


def pause() -> None:
    Path(f"{os.environ['MPO_TEST_MARKER']}.rank{os.environ.get('RANK', '0')}").write_text("")
    time.sleep(PAUSE_S)


def install(where: str) -> None:
    from mpo_dist import trainer

    point, _, step = where.partition(":")
    step = int(step or 0)

    def wrap(owner, name, before: bool, at_step):
        original = getattr(owner, name)

        @functools.wraps(original)
        def paused(*args, **kwargs):
            due = at_step(args)
            if due and before:
                pause()
            out = original(*args, **kwargs)
            if due and not before:
                pause()
            return out

        setattr(owner, name, paused)

    if point == "preflight":
        wrap(trainer, "check_training_inputs", True, lambda args: True)
    elif point == "step":
        wrap(trainer.Trainer, "train_step", True, lambda args: args[0].step + 1 == step)
    elif point in ("save", "after_save"):
        wrap(trainer.Trainer, "save_checkpoint", point == "save", lambda args: args[0].step == step)
    elif point == "eval":
        wrap(trainer.Trainer, "_evaluate", True, lambda args: args[0].step == step)
    else:
        raise SystemExit(f"MPO_TEST_PAUSE_AT: unknown point {where!r}")


if __name__ == "__main__":
    install(os.environ["MPO_TEST_PAUSE_AT"])
    from mpo_dist.train import main

    sys.exit(main(sys.argv[1:]))
