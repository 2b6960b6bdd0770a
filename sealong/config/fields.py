"""Config fields: one `option(...)` per setting (default, help, aliases, range), values coerced to the field's
type and checked, whatever their source (a flag, a YAML file, a preset or code).

    lr: float = option(5e-5, "peak learning rate", aliases=["learning_rate"], gt=0)

A value is checked in `__post_init__` of every stage config (`Checked`): floats must be finite, numbers inside
their range (ge / gt / le / lt), Literal values among their choices; `required=True` options are checked when a
stage is run from the command line (`check_required`). Errors are `ConfigError` naming the option.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from typing import Literal, Union, get_args, get_origin

ARGPARSE_KEYS = ("help", "aliases", "metavar")  # the metadata HfArgumentParser passes on to argparse
_TRUE, _FALSE = ("true", "yes", "y", "1", "on"), ("false", "no", "n", "0", "off")


class ConfigError(ValueError):
    """A bad option, value or config file; the message names the option (and the file:line when from a file)."""


def option(default=dataclasses.MISSING, help: str = "", *, aliases=(), factory=None, required=False,
           ge=None, gt=None, le=None, lt=None, sets=()):
    """A dataclass field with its help text, HF/TRL-style alias names and an optional numeric range; `sets`
    (pipeline options only) names the stages whose option of the same name it sets."""
    meta = {"help": help + (f" (sets it in: {', '.join(sets)})" if sets else "")}
    if sets:
        meta["sets"] = tuple(sets)
    if aliases:  # both spellings of each alias, like HfArgumentParser gives the field's own name
        meta["aliases"] = list(dict.fromkeys(s for a in aliases for s in (f"--{a}", f"--{a.replace('_', '-')}")))
    meta.update({k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None})
    if required:
        meta["required_option"] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.lru_cache(maxsize=None)
def type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def key_names(cls) -> dict:
    """{accepted key: field name}: the field names and their aliases (dashes read as underscores)."""
    names = {}
    for f in dataclasses.fields(cls):
        names[f.name] = f.name
        for alias in f.metadata.get("aliases", ()):
            names[alias.lstrip("-").replace("-", "_")] = f.name
    return names


def canonical(cls, key: str, where: str = "") -> str:
    """The field name for `key` (a name or an alias, either spelling); an unknown key suggests the closest."""
    names = key_names(cls)
    name = names.get(str(key).replace("-", "_"))
    if name is None:
        close = difflib.get_close_matches(str(key).replace("-", "_"), list(names), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}unknown key {key!r}{hint}; valid keys: {', '.join(f.name for f in dataclasses.fields(cls))}")
    return name


def _unwrap(tp):
    """(type without Optional, optional?)"""
    if get_origin(tp) is Union or type(tp).__name__ == "UnionType":
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(get_args(tp))
    return tp, False


def coerce(cls, name: str, value):
    """`value` as field `name`'s type: YAML and flag strings become numbers, "a,b" lists; a wrong type, a
    non-finite float or an unknown choice is a ConfigError naming the option."""
    tp, optional = _unwrap(type_hints(cls)[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required, got null")
    if get_origin(tp) in (list, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{name}: expected a list (or comma-separated string), got {value!r}")
        items = [p for v in items for p in (v.split(",") if isinstance(v, str) else [v])]
        return [_scalar(name, get_args(tp)[0], v.strip() if isinstance(v, str) else v)
                for v in items if not (isinstance(v, str) and not v.strip())]
    return _scalar(name, tp, value)


def _scalar(name, tp, value):
    def bad(expected, note=""):
        return ConfigError(f"{name}: expected {expected}, got {value!r}{note}")

    if get_origin(tp) is Literal:
        if value not in get_args(tp):
            raise bad("one of " + ", ".join(map(str, get_args(tp))))
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise bad("true or false")
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads off / no / yes as booleans
            raise bad("a string", " (quote it in YAML: off, on, yes and no are booleans there)")
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad("a string")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad(f"a{'n int' if tp is int else ' float'}")
    try:
        number = float(value) if tp is float or not isinstance(value, int) else value
    except ValueError:
        raise bad(f"a{'n int' if tp is int else ' float'}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name}: must be a finite number, got {value!r}")
    if tp is int:
        if not float(number).is_integer():
            raise bad("an int")
        return int(number)
    return float(number)


def check_value(cls, name: str, value):
    """`value` coerced to field `name`'s type and checked against its range; returns the coerced value."""
    value = coerce(cls, name, value)
    meta = field_map(cls)[name].metadata
    for v in value if isinstance(value, list) else [value]:
        for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                              ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            if v is not None and key in meta and not ok(v, meta[key]):
                raise ConfigError(f"{name} must be {word} {meta[key]}, got {v}")
    return value


@functools.lru_cache(maxsize=None)
def field_map(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def check_fields(cfg) -> None:
    """Every field's value: type-level checks (finite floats, choices) and its range; "a,b" -> [a, b]."""
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, check_value(type(cfg), f.name, getattr(cfg, f.name)))


def check_required(cfg) -> None:
    missing = [f.name for f in dataclasses.fields(cfg)
               if f.metadata.get("required_option") and getattr(cfg, f.name) in (None, "")]
    if missing:
        raise ConfigError(f"{', '.join('--' + m for m in missing)}: required")


class Checked:
    """Mixin of the stage configs: fields checked on construction (and on `dataclasses.replace`), then the
    config's own cross-field `checks()`: a list of (ok, message)."""

    def __post_init__(self):
        try:
            check_fields(self)
            for ok, message in self.checks():
                if not ok:
                    raise ConfigError(message)
        except ConfigError as err:
            raise ConfigError(f"{self.stage}: {err}") from None

    def checks(self):
        return []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
