"""Typed script configs: dataclass defaults < YAML file (``--config``) < command-line overrides.

Every entry point describes its options as one dataclass whose fields carry their help text in
``field(metadata={"help": ...})``. ``parse_config`` fills it from a YAML file and ``--field-name value``
options, converting each value to the field's annotated type::

    @dataclass
    class PretrainConfig:
        lr: float = field(default=1e-4, metadata={"help": "base learning rate for a batch of 256"})
        image_size: tuple[int, int] = (224, 224)
        compile: bool = False
        precision: Literal["no", "fp16", "bf16"] = "bf16"

    python pretrain.py --config base.yaml --lr 3e-4 --image-size 192,192 --compile --precision fp16

Bool fields accept ``--flag``, ``--no-flag`` and ``--flag true|false``; tuple and list fields accept
comma-separated values, several values after the option, or the option repeated; ``Optional`` fields
accept ``none``; ``Literal`` fields accept only their choices. transformers' example-script names of the same
options are aliases (``ALIASES``: ``--model_name_or_path``, ``--learning_rate``, ``--per_device_train_batch_size``,
``--resume_from_checkpoint``). Mistyped names fail with a one-line ``ConfigError`` that suggests the closest
valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .runlog import atomic_write_text

T = TypeVar("T")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~")
# transformers' example-script names of the same options: a command line or YAML file written for those scripts
# reads here too. An alias applies only where the config has its target and no field of its own name.
ALIASES = {
    "model_name_or_path": "model",
    "learning_rate": "lr",
    "per_device_train_batch_size": "per_device_batch_size",
    "resume_from_checkpoint": "resume_from",
}


class ConfigError(ValueError):
    """A config file or command line that names an unknown option or gives a value of the wrong type."""


# --- type introspection -------------------------------------------------------------------------------


def option(default: Any, help_text: str) -> Any:
    """A config field with its default and the help text `--help` prints."""
    return dataclasses.field(default=default, metadata={"help": help_text})


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` / ``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(args) == len(typing.get_args(tp)):
            raise TypeError(f"only Optional[X] unions are supported in configs, got {tp}")
        return args[0], True
    return tp, False


def _is_sequence(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple) or tp in (list, tuple)


def _is_bool(tp: Any) -> bool:
    return _strip_optional(tp)[0] is bool


def _type_name(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        name = "{" + ",".join(str(c) for c in typing.get_args(tp)) + "}"
    elif origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = _type_name(args[0]) if args else "STR"
        name = f"{item}[,{item}...]"
    else:
        name = getattr(tp, "__name__", str(tp)).upper()
    return f"{name}|none" if optional else name


# --- value conversion ---------------------------------------------------------------------------------


def _convert_scalar(value: Any, tp: Any, where: str) -> Any:
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
            # YAML 1.1 reads a bare `no` / `off` / `yes` as a bool: map it back to a matching string choice.
            if (
                isinstance(value, bool)
                and isinstance(choice, str)
                and choice.lower() in (_TRUE if value else _FALSE)
            ):
                return choice
        raise ConfigError(
            f"invalid value {value!r} for {where}; choose one of: {', '.join(map(str, choices))}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"invalid value {value!r} for {where}; expected true or false")
    if tp is Any:
        return value
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"invalid value {value!r} for {where}; expected an integer")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"invalid value {value!r} for {where}; expected a string (quote it in YAML)")
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid value {value!r} for {where}; expected {_type_name(tp)}") from None


def _split_items(value: Any) -> list[Any]:
    """CLI tokens and YAML strings split on commas; YAML lists stay as they are."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[Any] = []
    for item in items:
        if isinstance(item, str):
            out.extend(piece.strip() for piece in item.split(",") if piece.strip())
        else:
            out.append(item)
    return out


def convert_value(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value or CLI string(s) to the annotated type ``tp``; ``where`` names it in errors."""
    inner, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ConfigError(f"{where} cannot be none; give a {_type_name(inner)}")
    if not _is_sequence(inner):
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ConfigError(f"{where} takes one value, got {len(value)}: {list(value)}")
            value = value[0]
        return _convert_scalar(value, inner, where)
    origin = typing.get_origin(inner) or inner
    args = typing.get_args(inner)
    items = _split_items(value)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(items) != len(args):
            raise ConfigError(f"{where} takes exactly {len(args)} values, got {len(items)}: {items}")
        return tuple(_convert_scalar(v, a, where) for v, a in zip(items, args))
    item_type = args[0] if args else str
    converted = [_convert_scalar(v, item_type, where) for v in items]
    return tuple(converted) if origin is tuple else converted


# --- field table --------------------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _field_name(table: Mapping[str, Any], key: str) -> str:
    """The field a command-line or YAML name sets: dashes read as underscores, `ALIASES` resolved."""
    name = key.replace("-", "_")
    if name not in table and ALIASES.get(name) in table:
        return ALIASES[name]
    return name


def _suggest(name: str, valid: Sequence[str], prefix: str) -> str:
    """``"; did you mean --a, --b?"`` for the closest of ``valid`` (compared in dashed form), else ``""``."""
    dashed = {v.replace("_", "-"): v for v in valid}
    close = difflib.get_close_matches(name.replace("_", "-"), list(dashed), n=3, cutoff=0.7)
    shown = [prefix + (c if prefix == "--" else dashed[c]) for c in close]
    return f"; did you mean {', '.join(shown)}?" if shown else ""


# --- YAML ---------------------------------------------------------------------------------------------


def _read_yaml(cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping and convert its values; keys may use dashes or underscores."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values, not {type(data).__name__}")
    table = _fields(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = _field_name(table, str(key))
        if name not in table:
            hint = _suggest(str(key), list(table), prefix="") or "; see the script's --help"
            raise ConfigError(f"unknown key {key!r} in {path}{hint}")
        if name in values:
            raise ConfigError(f"{path.name} sets {name} twice (with dashes, underscores or an alias)")
        values[name] = convert_value(value, table[name][1], f"{name} in {path.name}")
    return values


# --- command line -------------------------------------------------------------------------------------


def _parse_cli(cls: type, argv: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """Split ``argv`` into the ``--config`` path and raw per-field values (strings, lists for sequences)."""
    table = _fields(cls)
    config_path: str | None = None
    raw: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; options look like --name value")
        key, has_inline, inline = token[2:].partition("=")
        name = _field_name(table, key)
        values: list[str] = [inline] if has_inline else []
        j = i + 1
        while not has_inline and j < len(argv) and not argv[j].startswith("--"):
            values.append(argv[j])
            j += 1
        i = j
        if name == "config":
            if len(values) != 1:
                raise ConfigError("--config takes one YAML file path")
            config_path = values[0]
            continue
        negated = name not in table and name[3:] in table and name.startswith("no_")
        if (name not in table and not negated) or (negated and not _is_bool(table[name[3:]][1])):
            hint = _suggest(key, [*table, "config"], prefix="--") or "; see --help"
            raise ConfigError(f"unknown option --{key}{hint}")
        tp = table[name[3:] if negated else name][1]
        if negated:
            if values:
                raise ConfigError(f"--{key} takes no value")
            name, values = name[3:], ["false"]
        elif _is_bool(tp) and not values:
            values = ["true"]
        elif not values:
            raise ConfigError(f"--{key} expects a value ({_type_name(tp)})")
        if _is_sequence(_strip_optional(tp)[0]):
            raw.setdefault(name, []).extend(values)
        elif len(values) > 1:
            raise ConfigError(f"--{key} takes one value, got {len(values)}: {values}")
        else:
            raw[name] = values[0]
    return config_path, raw


def format_help(cls: type, prog: str | None = None) -> str:
    """The ``--help`` text: every field with its type, default and help."""
    prog = prog or Path(sys.argv[0]).name
    lines = [f"usage: {prog} [--config FILE.yaml] [--option VALUE ...]", ""]
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
        lines += [cls.__doc__.strip(), ""]
    lines += [
        "options:",
        "  --config FILE.yaml",
        "      YAML file with any of the options below; the command line overrides it",
    ]
    for name, (f, tp) in _fields(cls).items():
        flag = "--" + name.replace("_", "-")
        flag += f", --no-{name.replace('_', '-')}" if _is_bool(tp) else f" {_type_name(tp)}"
        flag += "".join(f" (alias --{alias})" for alias, target in ALIASES.items() if target == name)
        default = _default(f)
        shown = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        help_text = f.metadata.get("help", "")
        lines += [f"  {flag}", f"      {help_text} ({shown})" if help_text else f"      ({shown})"]
    return "\n".join(lines)


# --- public API ---------------------------------------------------------------------------------------


def _build(cls: type[T], values: dict[str, Any]) -> T:
    table = _fields(cls)
    missing = [n for n, (f, _) in table.items() if n not in values and _default(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError(
            f"missing required option(s): {', '.join('--' + n.replace('_', '-') for n in missing)}"
        )
    return cls(**values)


def parse_config(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Build a ``cls`` instance from defaults, an optional ``--config`` YAML file and CLI overrides.

    ``--help`` / ``-h`` prints every field and exits with status 0. Raises ``ConfigError`` (a
    ``ValueError``) with a one-line message on unknown names or values of the wrong type.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(format_help(cls))
        raise SystemExit(0)
    config_path, raw = _parse_cli(cls, argv)
    values = _read_yaml(cls, config_path) if config_path else {}
    table = _fields(cls)
    for name, value in raw.items():
        values[name] = convert_value(value, table[name][1], "--" + name.replace("_", "-"))
    return _build(cls, values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass as plain YAML/JSON types (tuples become lists, paths become strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically); ``parse_config(cls, ["--config", path])`` reads it back."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def config_diff(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """Names among ``keys`` whose values differ between ``a`` and ``b`` (tuples equal lists; absent != None)."""
    missing = object()

    def norm(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        return value

    return [k for k in keys if norm(a.get(k, missing)) != norm(b.get(k, missing))]


def run_cli(main_fn: Callable[[T], Any], cls: type[T], argv: Sequence[str] | None = None) -> Any:
    """Parse ``cls`` from the command line, validate it and call ``main_fn(cfg)``.

    A bad option, value or ``cfg.validate()`` failure prints ``error: <message>`` on one line to stderr
    and exits with status 2, the argparse convention; errors raised by ``main_fn`` itself propagate.
    """
    try:
        cfg = parse_config(cls, argv)
        validate = getattr(cfg, "validate", None)
        if callable(validate):
            validate()
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    return main_fn(cfg)
