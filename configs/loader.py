"""Load a run config: typed schema <- YAML preset <- `key.sub=value` overrides, through OmegaConf.

    cfg = load_config("configs/tiny_cpu.yaml", ["learner.lr=3e-6", "rollout.num_workers=2"])

The result is a plain `configs.schema.Config` (dataclasses all the way down): code never sees a
`DictConfig`. Every mistake raises `ConfigError` with one line that names the key, where it came
from, and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from configs.errors import ConfigError
from configs.schema import Config

PRESET_DIR = Path(__file__).resolve().parent


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, else a preset name in `configs/` (`tiny_cpu` or `tiny_cpu.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (PRESET_DIR / path.name, PRESET_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config file not found: {name} (presets: {presets})")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge the schema, the YAML file at `path` (if any) and the overrides into a `Config`."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        file = resolve_config_path(path)
        merged = _merge(merged, _read_yaml(file), f"in {file}")
    if overrides:
        merged = _merge(merged, _parse_overrides(overrides), "on the command line")
    try:
        cfg = OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise ConfigError(
            f"missing required value: {e.full_key} (set it in the config file or as {e.full_key}=...)"
        ) from None
    except OmegaConfBaseException as e:
        # __post_init__ validators raise ConfigError; OmegaConf wraps it with context.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"{getattr(e, 'full_key', '')}: {_first_line(e)}") from None
    assert isinstance(cfg, Config)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what `estuary config show` prints and MLflow stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _read_yaml(file: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(file)
    except Exception as e:  # yaml.YAMLError carries the line and column in its message
        raise ConfigError(f"cannot parse {file}: {_first_line(e)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{file} must hold a mapping of sections (run:, model:, ...), not a list")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key or key.strip() != key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. learner.lr=3e-6)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {_first_line(e)}") from None


def _merge(base: DictConfig, extra: DictConfig, where: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, extra)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(e.full_key, where)) from None
    except ValidationError as e:
        raise ConfigError(_type_message(e.full_key, extra, where, e)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '')} {where}: {_first_line(e)}") from None
    assert isinstance(merged, DictConfig)
    return merged


def _unknown_key_message(full_key: str, where: str) -> str:
    parts = full_key.split(".")
    parent_type, parent_path = _schema_type(parts[:-1])
    valid = [f.name for f in dataclasses.fields(parent_type)] if _is_dataclass(parent_type) else []
    close = difflib.get_close_matches(parts[-1], valid, n=3, cutoff=0.5) or valid[:6]
    prefix = ".".join(parent_path)
    options = ", ".join(f"{prefix}.{k}" if prefix else k for k in close)
    return f"unknown config key '{full_key}' {where}; did you mean: {options}"


def _type_message(full_key: str, source: DictConfig, where: str, e: Exception) -> str:
    parts = full_key.split(".") if full_key else []
    hint, _ = _schema_type(parts)
    value = OmegaConf.select(source, full_key, default=None, throw_on_missing=False)
    if hint is None or not full_key:
        return f"invalid value {where}: {_first_line(e)}"
    return f"config key '{full_key}' {where}: value {value!r} is not a valid {_type_name(hint)}"


def _schema_type(parts: list[str]) -> tuple[Any, list[str]]:
    """The schema type at a dotted path; dict entries (environments.<name>) use the value type."""
    node: Any = Config
    for part in parts:
        node = _strip_optional(node)
        if _is_dataclass(node):
            hints = typing.get_type_hints(node)
            if part not in hints:
                return None, parts
            node = hints[part]
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        elif typing.get_origin(node) is list:
            node = typing.get_args(node)[0]
        else:
            return None, parts
    return _strip_optional(node), parts


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _is_dataclass(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
