"""Entry point: `torchrun ... -m mpo_dist.train --config configs/X.yaml [section.key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from mpo_dist.config import ConfigError, load_config
from mpo_dist.distributed import destroy_distributed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Preference optimisation (MPO, DPO, IPO) with FSDP2.")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=3e-6")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"mpo_dist: config error: {error}", file=sys.stderr)
        return 2
    from mpo_dist.data.shards import ShardError
    from mpo_dist.distributed import rank_info_from_env
    from mpo_dist.trainer import Trainer  # heavy imports after the config is known to be valid

    trainer = None
    try:
        trainer = Trainer(config)
        trainer.train()
    except (ShardError, ValueError, FileNotFoundError) as error:
        # Input errors are found on every rank before training: one clear line each, no traceback.
        print(f"mpo_dist: error on rank {rank_info_from_env().rank}: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
