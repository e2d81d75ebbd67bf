"""Inputs and checks for the cluster scripts (launch/test_slurm.sh, launch/test_two_hosts.sh):
    python tests/cluster_support.py inputs DIR          the toy task's inputs, small, in DIR
    python tests/cluster_support.py overrides DIR OUT   the training overrides for DIR's inputs, one per line
    python tests/cluster_support.py equal A B           exit 0 when two checkpoint folders are bitwise equal
The scripts run these with the repository on PYTHONPATH; what they build is what tests/support.py's
toy_inputs fixture builds (one function serves both)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import build_toy_inputs, flat_checkpoint, toy_overrides  # noqa: E402


def toy_folders(root: Path) -> dict[str, Path]:
    """build_toy_inputs' folders under `root`, once built."""
    return {"model": root / "toy" / "model", **{name: root / name for name in ("pairs", "reference", "dref")}}


def differing_keys(first: Path, second: Path) -> list[str]:
    """Names whose values differ between two checkpoint folders (missing on one side included)."""
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "a").mkdir()  # one folder per side: the two checkpoints may have the same names
        (Path(scratch) / "b").mkdir()
        a = flat_checkpoint(first, Path(scratch) / "a")
        b = flat_checkpoint(second, Path(scratch) / "b")
    same = lambda x, y: torch.equal(x, y) if torch.is_tensor(x) and torch.is_tensor(y) else x == y  # noqa: E731
    return sorted(set(a) ^ set(b)) + sorted(key for key in set(a) & set(b) if not same(a[key], b[key]))


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "inputs":
        build_toy_inputs(Path(args[0]))
    elif command == "overrides":
        print("\n".join(toy_overrides(toy_folders(Path(args[0])), Path(args[1]))))
    elif command == "equal":
        differing = differing_keys(Path(args[0]), Path(args[1]))
        if differing:
            print(f"{len(differing)} entries differ between {args[0]} and {args[1]}: {', '.join(differing[:10])}")
            return 1
        print(f"bitwise equal: {args[0]} and {args[1]}")
    else:
        raise SystemExit(f"unknown command {command!r}: inputs, overrides or equal")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
