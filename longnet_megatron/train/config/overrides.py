"""Reading a job: YAML files, ``section.field=value`` overrides, type checks; and writing it back.

    job = load_config("configs/tiny_cpu.yaml", ["train.steps=50", "parallel.tensor_model_parallel_size=2"])

Values are parsed as YAML (``optim.lr=3e-4``, ``data.prefixes=[a,b]``, ``model.use_te=null``) and
checked against the field's type; a key that appears twice in one YAML mapping is an error (YAML
itself would silently keep the last), as is an unknown key (with a did-you-mean).
"""

from __future__ import annotations

import os
import types
import typing
from typing import Any

import yaml

from longnet_megatron.train.config.schema import (
    ConfigError,
    JobConfig,
    _did_you_mean,
    _section_names,
    _split_key,
)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (the file line in the message)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice (lines {seen[key]} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against (and, for YAML's int-for-float, converted to) the field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} cannot be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[a,b]")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a schema bug, not a user error


def set_value(job: JobConfig, key: str, value: Any) -> None:
    """Set ``section.field`` to ``value`` (type-checked), naming the key on error."""
    section, name = _split_key(job, key)
    target = getattr(job, section)
    hints = typing.get_type_hints(type(target))
    setattr(target, name, _coerce(key, value, hints[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key.strip()}: cannot read {raw!r} ({e})") from None
    return key.strip(), value


def config_from_dict(data: dict[str, Any], job: JobConfig | None = None) -> JobConfig:
    """Apply a nested dict (a YAML document, or a checkpoint's saved config) onto ``job``."""
    job = job or JobConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"the configuration must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in _section_names(job):
            raise ConfigError(f"unknown section {section!r}{_did_you_mean(section, _section_names(job))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping of field: value")
        for name, value in values.items():
            set_value(job, f"{section}.{name}", value)
    return job


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """The config of YAML file ``path`` (None: all defaults) with ``key=value`` overrides applied in order."""
    job = JobConfig()
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path} is not valid YAML: {e}") from None
        config_from_dict(data, job)
    for text in overrides:
        set_value(job, *parse_override(text))
    return job


def dump_config(job: JobConfig, path: str) -> None:
    """Write ``job`` as YAML (the run directory's resolved config)."""
    with open(path, "w") as f:
        yaml.safe_dump(job.to_dict(), f, sort_keys=False)
