"""Training configuration: the options (`sections`: a dataclass per section, each option's default and
help) and reading them (`loading`: YAML file, `section.key=value` overrides, errors naming key and source).

Import from here: `from mpo_dist.config import Config, DataConfig, load_config`.
"""

from mpo_dist.config.loading import COMMAND_LINE, DEFAULT, config_to_dict, describe_config, load_config, save_config
from mpo_dist.config.sections import (CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, InvalidOption, JobConfig,
                                      LossConfig, MetricsConfig, ModelConfig, OptimConfig, ParallelConfig, TrainingConfig,
                                      grad_accum_for, opt)

__all__ = ["COMMAND_LINE", "DEFAULT", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
           "InvalidOption", "JobConfig", "LossConfig", "MetricsConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
           "TrainingConfig", "config_to_dict", "describe_config", "grad_accum_for", "load_config", "opt", "save_config"]
