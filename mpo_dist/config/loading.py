"""Reading a config: defaults, then a YAML file, then `section.key=value` command-line overrides, each
value type-checked as it is set and the whole validated; and writing one back (the resolved YAML,
the option table of --options).

Unknown sections or keys, wrong types and out-of-range values are errors (`ConfigError`) that name
the dotted key, where the value came from and what is allowed, so a typo never silently trains
with a default.
"""

import dataclasses
import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from mpo_dist.config.sections import Config, ConfigError, InvalidOption

COMMAND_LINE = "command line"
DEFAULT = "default"


class _Mismatch(Exception):
    pass


def _type_label(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    return tp.__name__ if isinstance(tp, type) and get_origin(tp) is None else str(tp)


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or _Mismatch. Deliberately strict: no bool-as-int, no 1.5-as-int."""
    if get_origin(tp) is Literal:
        if isinstance(value, str) and value in get_args(tp):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # PyYAML (YAML 1.1) reads `3e-6` as a string, so numeric strings are accepted too.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif get_origin(tp) is list:
        if isinstance(value, list):
            try:
                return [_coerce(v, get_args(tp)[0]) for v in value]
            except _Mismatch:
                pass
    elif tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
    raise _Mismatch


def _closest(name: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(str(name), valid, n=1)
    return f"did you mean {match[0]!r}? " if match else ""


def _section(config: Config, name: Any, source: str) -> Any:
    valid = [f.name for f in fields(config)]
    if name not in valid:
        raise ConfigError(f"unknown section {name!r} ({source}); {_closest(name, valid)}"
                          f"valid sections: {', '.join(valid)}")
    return getattr(config, name)


def _assign(config: Config, section_name: Any, key: Any, value: Any, source: str,
            sources: dict[str, str], nested: Sequence[str] = (), raw: str | None = None) -> None:
    """Set `section.key` (or a key inside a dict field, via `nested`) after checking its type."""
    section = _section(config, section_name, source)
    by_name = {f.name: f for f in fields(section)}
    dotted = f"{section_name}.{key}"
    if key not in by_name:
        raise ConfigError(f"unknown key {dotted} ({source}); {_closest(key, list(by_name))}"
                          f"valid keys of {section_name}: {', '.join(by_name)}")
    tp = by_name[key].type
    if nested:
        if tp is not dict:
            raise ConfigError(f"{dotted}.{'.'.join(nested)}: {dotted} is a {_type_label(tp)}, "
                              f"not a mapping ({source})")
        target = getattr(section, key)
        for part in nested[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{dotted}.{'.'.join(nested)}: {part} is not a mapping ({source})")
        target[nested[-1]] = value
        sources[dotted] = source
        return
    if raw is not None and tp is str:
        value = raw  # a path like `123` or `null` given on the command line is still a string
    try:
        value = _coerce(value, tp)
    except _Mismatch:
        raise ConfigError(f"{dotted}: expected {_type_label(tp)}, got {value!r} "
                          f"({type(value).__name__}) ({source})") from None
    setattr(section, key, value)
    sources[dotted] = source


def _read_yaml(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {path} must be a mapping of section -> {{key: value}}, "
                          f"got {type(raw).__name__}")
    return raw


def _parse_override(item: str) -> tuple[list[str], Any, str]:
    dotted, eq, text = item.partition("=")
    parts = dotted.strip().split(".")
    if not eq or len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {item!r} must look like section.key=value ({COMMAND_LINE})")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({COMMAND_LINE}): {e}") from None
    return parts, value, text


def _where(keys: Sequence[str], sources: dict[str, str]) -> str:
    where = [sources.get(k, DEFAULT) for k in keys]
    if len(set(where)) == 1:
        return where[0]
    return ", ".join(f"{k} from {w}" for k, w in zip(keys, where))


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `section.key=value` overrides; validated."""
    config = Config()
    sources: dict[str, str] = {}  # dotted key -> where it was last set, for error messages
    if path is not None:
        source = str(path)
        for section_name, values in _read_yaml(source).items():
            _section(config, section_name, source)
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise ConfigError(f"section {section_name!r} must be a mapping of key: value, "
                                  f"got {values!r} ({source})")
            for key, value in values.items():
                _assign(config, section_name, key, value, source, sources)
    for item in overrides:
        parts, value, text = _parse_override(item)
        _assign(config, parts[0], parts[1], value, COMMAND_LINE, sources, nested=parts[2:], raw=text)
    try:
        config.validate()
    except InvalidOption as e:
        raise ConfigError(f"{e} ({_where(e.keys, sources)})") from None
    return config


# ---- saving and documentation ---------------------------------------------------------------------

def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML that load_config reads back to an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def describe_config() -> str:
    """A Markdown table of every option (key, type, default, description), generated from the dataclasses."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for section in fields(Config):
        for f in fields(section.type):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            cells = [f"`{section.name}.{f.name}`", _type_label(f.type), f"`{json.dumps(default)}`",
                     f.metadata["help"]]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
