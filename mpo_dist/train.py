"""Entry point: `torchrun ... -m mpo_dist.train --config configs/X.yaml [section.key=value ...]`.

Also runs as one plain process (`python -m mpo_dist.train ...`). An input error (config, shards,
data/model mismatch) prints one line per rank and exits 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from mpo_dist.cli import run_main
from mpo_dist.config import config_to_dict, describe_config, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Preference optimisation (MPO, DPO, IPO) with FSDP2. Run under torchrun for several "
                    "processes, or as one plain process.",
        epilog="Every option is a section.key of the config: --options lists them with defaults and "
               "descriptions; --print-config shows the resolved config of --config and the overrides.")
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--options", action="store_true", help="list every config option (key, type, default, meaning) and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=3e-6")
    args = parser.parse_args(argv)
    if not args.options and not args.config:
        parser.error("--config is required (or --options to list the config options)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.options:
        print(describe_config(), end="")
        return 0
    if args.print_config:
        import yaml

        return run_main("mpo_dist", lambda info: print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)),
                                                                     sort_keys=False), end=""))
    trainer = None

    def body(info) -> None:
        nonlocal trainer
        config = load_config(args.config, args.overrides)
        from mpo_dist.trainer import Trainer  # heavy imports after the config is known to be valid

        trainer = Trainer(config)
        trainer.train()

    # single_process_group: the one place the trainer's process group is set up; a plain process gets a
    # group of its own too (FSDP2 and DCP need one at any size), and the Trainer uses the group it finds.
    # threads=0: OMP_NUM_THREADS when set (torchrun sets 1 for several processes per node), else the
    # cores divided among this node's processes, so processes never oversubscribe the cores.
    return run_main("mpo_dist", body, single_process_group=True, threads=0,
                    cleanup=lambda: trainer is not None and trainer.close())


if __name__ == "__main__":
    sys.exit(main())
