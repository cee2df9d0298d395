"""Typed configs: dataclasses loaded from YAML, with dotted command-line overrides.

Every config is a (nested) dataclass whose fields carry a default, a one-line ``help`` and optional
bounds in ``field(metadata=...)``. Loading is strict: an unknown key, a value of the wrong type or one
outside its allowed range raises :class:`ConfigError` naming the dotted key and what is allowed, before
any work starts.

    @dataclass
    class Train:
        lr: float = option(1e-4, "AdamW learning rate", min=0.0)
        sampler: str = option("euler", "ODE solver", choices=("euler", "dpmpp"))

    cfg = load_config(MyConfig, "configs/x.yaml", overrides=["train.lr=3e-4"])
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from dgpo.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           choices: Sequence[Any] | None = None, length: int | tuple[int, ...] | None = None):
    """A dataclass field with a default, a one-line help text and optional bounds/choices (a list's bounds hold
    for each item; ``length``: the list lengths allowed, e.g. 2 for Adam's betas)."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None,
            "length": (length,) if isinstance(length, int) else length}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls, help: str = ""):
    """A nested config section (a dataclass field whose default is ``cls()``)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


# ---------------------------------------------------------------------------------------------- coercion

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, list[...], X | None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan passes every bound check, inf every minimum
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _yaml_word(value: Any, tp, choices) -> Any:
    """A string choice that YAML read as a boolean (``no``, ``off``, ``yes`` …) back as that choice, so that
    ``--set model.mixed_precision=no`` means the choice "no" rather than failing as ``False``."""
    if tp is str and isinstance(value, bool) and choices:
        words = [c for c in choices if isinstance(c, str) and yaml.safe_load(c) is value]
        if len(words) == 1:
            return words[0]
    return value


def _check_bounds(value: Any, meta: dict, key: str) -> None:
    choices, lo, hi, lengths = meta.get("choices"), meta.get("min"), meta.get("max"), meta.get("length")
    if lengths is not None and isinstance(value, list) and len(value) not in lengths:
        allowed = " or ".join(str(n) for n in lengths)
        raise ConfigError(f"{key}: expected a list of {allowed} items, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(choices)}")
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and v < lo:
                raise ConfigError(f"{key}: {v!r} is below the minimum {lo}")
            if hi is not None and v > hi:
                raise ConfigError(f"{key}: {v!r} is above the maximum {hi}")


# ---------------------------------------------------------------------------------------------- building

def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a plain dict, validating every key, type and bound."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys here: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, data[name], key + ".")
        else:
            value = _coerce(_yaml_word(data[name], tp, f.metadata.get("choices")), tp, key)
            _check_bounds(value, f.metadata, key)
            kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """The config as plain nested dicts/lists (what ``config.yaml`` in a run folder holds)."""
    return dataclasses.asdict(cfg)


def flat_dict(d: dict, prefix: str = "", sep: str = "/") -> dict:
    """A nested dict as one level: ``{"a": {"b": 1}}`` → ``{"a/b": 1}`` (keys joined by ``sep``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}{sep}", sep))
        else:
            out[prefix + k] = v
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently: a second
    ``run:`` section would drop the first one's keys)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"the key {key!r} is given twice, at lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}: keep one (the second would silently replace the first)")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_config(cls, path: str | Path | None = None, overrides: Sequence[str] = ()):
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus dotted overrides."""
    return from_dict(cls, read_config_data(path, overrides))


def read_config_data(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """The nested mapping a YAML config file (none: empty) and its dotted overrides set, before it is typed:
    what the user set, for a loader that picks the config's type from it (a method's own section)."""
    data: dict = {}
    if path is not None:
        from dgpo.recipes import resolve_config_path
        path = resolve_config_path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a folder; pass a YAML file, e.g. one under configs/")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file under configs/")
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except ConfigError as e:
            raise ConfigError(f"config file {str(path)!r}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    apply_overrides(data, overrides)
    return data


def describe(cls, prefix: str = "", values: dict | None = None) -> list[str]:
    """One line per field, ``key = value [bounds]: help``, grouped by section: each section opens with a line
    ``[section] its help`` and its keys follow, indented — used by ``--help`` texts. The value is the field's
    default, or its value in ``values`` (a loaded config's :func:`to_dict`: what a command's default recipe runs)."""
    lines = []
    hints = typing.get_type_hints(cls)
    values = values or {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{prefix}{f.name}] {f.metadata.get('help', '')}".rstrip())
            lines += ["  " + line for line in describe(tp, prefix + f.name + ".", values.get(f.name))]
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = values.get(f.name, default)
        extra = []
        if f.metadata.get("choices"):
            extra.append("one of " + "/".join(map(str, f.metadata["choices"])))
        if f.metadata.get("min") is not None:
            extra.append(f">= {f.metadata['min']}")
        if f.metadata.get("max") is not None:
            extra.append(f"<= {f.metadata['max']}")
        bounds = f" [{', '.join(extra)}]" if extra else ""
        lines.append(f"{prefix}{f.name} = {default!r}{bounds}: {f.metadata.get('help', '')}")
    return lines
