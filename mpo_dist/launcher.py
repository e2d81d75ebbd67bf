"""torchrun, with input errors passed through: `python -m mpo_dist.launcher [torchrun options] -m mpo_dist.train ...`.

Takes exactly torchrun's options. When every failed worker exited with the input-error code (2),
the workers have already printed one line each saying what to change: the launcher then exits 2
itself instead of adding torchrun's multi-screen `ChildFailedError` report. Any other failure is
reported by torchrun as usual. The launch scripts and the container entrypoint use it.
"""

from __future__ import annotations

import sys

from mpo_dist.errors import INPUT_ERROR_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as failed:
        if {failure.exitcode for failure in failed.failures.values()} == {INPUT_ERROR_EXIT_CODE}:
            return INPUT_ERROR_EXIT_CODE
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
