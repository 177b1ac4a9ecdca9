"""The training job's configuration: schema (:mod:`.schema`), reading and overrides (:mod:`.overrides`),
checks (:mod:`.validation`). :func:`longnet_megatron.train.job.resolve_job` turns it into what runs.

    job = load_config("configs/tiny_cpu.yaml", ["train.steps=50"])
"""

from longnet_megatron.train.config.overrides import (
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
    set_value,
)
from longnet_megatron.train.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "JobConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "dump_config",
    "load_config",
    "parse_override",
    "set_value",
]
