"""Parse plain mappings (TOML tables, ``--set`` flags, Flower run-config) into frozen dataclasses.

Unknown keys are errors, values are converted to the annotated type once, and every error
names the full dotted key, so a typo in a merchant's configuration never silently becomes a
default privacy parameter. Text from the command line (``--set``) is parsed into numbers and
booleans; a TOML file has its own, so a quoted ``"3"`` or ``"yes"`` there is refused rather
than guessed at.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError

T = TypeVar("T")


class TomlString(str):
    """A string as written in a TOML file: text, never a number or boolean in quotes."""

    __slots__ = ()


def _from_toml(value: Any) -> Any:
    """``value`` with every string marked as :class:`TomlString`, at any depth."""
    if isinstance(value, str):
        return TomlString(value)
    if isinstance(value, dict):
        return {key: _from_toml(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_toml(item) for item in value]
    return value


def _refuse_quoted(value: Any, key: str, expected: str) -> None:
    if isinstance(value, TomlString):
        raise ConfigError(f"{key}: expected {expected}, got the string {str(value)!r}")


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        blank = value is None or (isinstance(value, str) and value.lower() in ("", "none"))
        if blank and type(None) in typing.get_args(annotation):
            return None
        for option in options:
            try:
                return _convert(value, option, key)
            except ConfigError as exc:
                if len(options) == 1:  # its own message says what was expected
                    raise exc from None
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {annotation}")
    if origin is tuple:
        (inner, *_rest) = typing.get_args(annotation) or (str,)
        if isinstance(value, TomlString) and inner is not str:
            raise ConfigError(f"{key}: expected a TOML array, got the string {str(value)!r}")
        if isinstance(value, str):  # "a,b" from --set
            items: list[Any] = value.split(",")
        else:
            items = list(value)
        return tuple(
            _convert(type(item)(item.strip()) if isinstance(item, str) else item, inner, key)
            for item in items
        )
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return from_mapping(annotation, value, prefix=key)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in annotation)
            raise ConfigError(f"{key}: {value!r} is not one of {allowed}") from None
    if annotation is bool:
        _refuse_quoted(value, key, "a TOML boolean (true or false, without quotes)")
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        _refuse_quoted(value, key, "a TOML integer (without quotes)")
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if annotation is float:
        _refuse_quoted(value, key, "a TOML number (without quotes)")
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # also keeps every configuration hashable canonically
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if annotation is Path:
        return Path(str(value))
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build ``cls`` from ``data``; unknown keys and bad values raise :class:`ConfigError`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = {name.replace("_", "-"): name for name in fields}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        name = names.get(raw_key.replace("_", "-"))
        dotted = f"{prefix}.{raw_key}" if prefix else raw_key
        if name is None:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown configuration key {dotted!r} (known here: {known})")
        kwargs[name] = _convert(value, hints[name], dotted)
    missing = [
        f"{prefix}.{name}" if prefix else name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        keys = ", ".join(repr(key) for key in missing)
        raise ConfigError(f"missing required key{'s' if len(missing) > 1 else ''} {keys}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{exc}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (from ``--set``) to a nested mapping, copy-on-write."""
    result: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. privacy.epsilon_cap=3")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value.strip()
    return result


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, naming the file and line on a syntax error. Its strings come back as
    :class:`TomlString`, so that a quoted number or boolean in it is refused, not parsed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(
            f"configuration file {path} is a directory; expected a TOML file"
        ) from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path} cannot be read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"configuration file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
            f"offset {exc.start}); expected a TOML file"
        ) from None
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    marked: dict[str, Any] = _from_toml(parsed)
    return marked


def as_plain_dict(obj: Any) -> Any:
    """The inverse of :func:`from_mapping`: JSON/TOML-safe nested dicts (enums by value)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_plain_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [as_plain_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
