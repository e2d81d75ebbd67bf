"""What every command-line entry point shares: argument parsing, the process group, and errors.

`run_main` is the one error path of the trainer and the tools: an `InputError` (bad option, flag,
file or shard) prints one line naming what to change and exits with code 2 on every rank that
found it; any other exception is re-raised with its traceback after the process group is left.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from typing import Callable

from mpo_dist.distributed import RankInfo, configure_cpu_threads, destroy_distributed, init_distributed, wait_for_peers
from mpo_dist.errors import INPUT_ERROR_EXIT_CODE, TERMINATED_EXIT_CODE, InputError, Terminated
from mpo_dist.progress import end_line, shown


INPUT_ERROR_GRACE_S = 10.0  # how long a rank with an input error waits for the others to report theirs


def _raise_terminated(signum, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM, during the cleanup, ends the process at once
    raise Terminated(signal.Signals(signum).name)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default in --help.

    A default of None ("not given") and the off state of an on/off flag say nothing, so they are not
    shown; an option whose default depends on others says so in its help text instead.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def tool_parser(description: str) -> argparse.ArgumentParser:
    """A tool's parser: `description` (its module docstring) as written; every option needs a help
    text, since argparse shows the default only beside one."""
    return argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="CPU threads per process; 0: OMP_NUM_THREADS if set (torchrun sets 1), else the "
                             "cores divided among this node's processes")


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="show no progress (by default rank 0 shows an updating line on a terminal, a plain line "
                             "every few seconds otherwise; MPO_DIST_PROGRESS=0 turns it off as well)")


def quiet_known_warnings() -> None:
    """Warnings that users cannot act on (set once by an entry point, never at import time)."""
    # torchdata 0.11 calls a deprecated torch API on every loader.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    # DCP without a process group (conversion, one-process runs): it says so on every call.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    # Random init of sharded parameters on a CPU mesh: the trainer seeds and initialises per rank itself.
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")


def original_message(error: BaseException) -> str:
    """The error's own message. An exception raised in a DataLoader worker is re-raised in the main
    process with the worker's whole traceback in its message: keep only what the error said."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    marker = f"{type(error).__name__}: "
    return text[text.rfind(marker) + len(marker):].strip() if marker in text else text.strip().splitlines()[-1]


def run_main(name: str, body: Callable[[RankInfo], None], *, backend: str | None = None,
             single_process_group: bool = False, threads: int | None = None,
             cleanup: Callable[[], None] = lambda: None, progress: bool = True) -> int:
    """Join the process group (torchrun) or run alone, run `body(info)`, always leave the group.

    This is where every entry point's process group is set up, once (`init_distributed`); code that
    needs one, like the Trainer, uses it (`distributed.rank_info_of_group`) and never makes its own.
    `single_process_group`: a plain process without torchrun gets a group of one too.

    Returns 0, or 2 after printing an input error in one line, or 143 when SIGTERM stopped the body
    (after its cleanup: `Terminated`); a rank of a multi-process launch exits with that code instead
    of returning (`_end_rank`). Other exceptions propagate.
    `threads` (None: leave torch's setting) is passed to `configure_cpu_threads`. `progress`: False
    for a tool's --no-progress (`add_progress_flag`); a progress line still drawn is ended before an
    error message or traceback.
    """
    quiet_known_warnings()
    if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
        # SIGUSR1 too: SLURM's warning ahead of a time limit; the trainer records both once training
        # runs (preemption.py), and before that, or in a tool, they stop the work where it is.
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, _raise_terminated)
    try:
        info = init_distributed(backend=backend, single_process_group=single_process_group)
    except InputError as error:  # before any group exists (e.g. more processes than GPUs): no peer to wait for
        _print_input_error(name, error)
        return INPUT_ERROR_EXIT_CODE
    if threads is not None:
        configure_cpu_threads(info, threads)
    code = 0
    try:
        with shown(progress):
            body(info)
    except InputError as error:
        code = INPUT_ERROR_EXIT_CODE
        _print_input_error(name, error, f" (rank {info.rank})" if info.world_size > 1 else "")
        # The ranks usually find the same error: let each say so before torchrun stops the others.
        wait_for_peers(INPUT_ERROR_GRACE_S)
    except Terminated as signal_name:
        code = TERMINATED_EXIT_CODE
        where = f" (rank {info.rank})" if info.world_size > 1 else ""
        _write_stderr(f"{name}: stopped by {signal_name}{where}; what was saved before it is kept\n")
    finally:
        try:
            cleanup()
        finally:
            if code and info.world_size > 1:
                # Without leaving the group: with a barrier a late peer never reached, or a peer that
                # already left, that could block or abort (`_end_rank`).
                _end_rank(code)
            destroy_distributed()
    if info.world_size > 1:
        _end_rank(code)
    return code


def _print_input_error(name: str, error: InputError, where: str = "") -> None:
    _write_stderr(f"{name}: error{where}: {original_message(error)}\n")


def _write_stderr(text: str) -> None:
    # One write call: lines of several ranks sharing a terminal or pipe never interleave.
    end_line()
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), text.encode())


def _end_rank(code: int) -> None:
    """End a rank of a multi-process launch now, its files closed (the body returned, cleanup ran),
    without interpreter shutdown: that can free work gloo's threads still hold and abort (SIGABRT,
    "terminate called without an active exception"; seen under load after an input error and after
    a clean finish), and torchrun would then report a crash instead of the exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
