"""Exact-typed, bounded reading of JSON that crossed a boundary into a frozen dataclass.

Python is lenient where a federation cannot be: `True` is an `int`, `16.0 == 16`, and a dataclass
takes whatever it is handed. A value that only looks right passes every `==` check and fails later,
deep inside (a float slot count breaks `range`; `True` as a slot writes slot 1's rows of every
table), after it was persisted. So every field is checked against its annotation here, once, at
the edge: an int is an int (not a bool, not a float), a string is bounded and printable, a list is
bounded, nested dataclasses recurse, unknown or missing fields are named. Nothing is coerced except
an integer where a float is declared (JSON writes 0.0 as 0).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

MAX_STR = 256  # characters of any string field without a tighter rule of its own
MAX_ITEMS = 4096  # entries of any list or object (a layout has one per target layer)
MAX_INT = 2**53  # |int|: beyond what JSON readers in other languages keep exact
Scalar = typing.Union[str, int, float, bool, None]
# the values free-form objects (train_config) may hold: a scalar, or a flat list of them (a tuple field)
FreeValue = typing.Union[Scalar, tuple[Scalar, ...]]


class SchemaError(ValueError):
    """A JSON value does not have the declared type or bounds; the message names the field path."""


def check_text(value: Any, what: str, max_len: int = MAX_STR) -> str:
    """A printable string of 1..max_len characters: no control characters, no lone UTF-16
    surrogates (they cannot be encoded back to UTF-8 in a response or a log line)."""
    if type(value) is not str:
        raise SchemaError(f"{what} must be a string, got {_kind(value)}")
    if not 0 < len(value) <= max_len:
        raise SchemaError(f"{what} must be 1-{max_len} characters, got {len(value):,}")
    if not value.isprintable():
        raise SchemaError(f"{what} contains control characters or unpaired surrogates: {value[:40]!a}")
    return value


def parse(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a JSON object whose every field has exactly its declared type."""
    where = where or cls.__name__
    if type(data) is not dict:
        raise SchemaError(f"{where} must be a JSON object, got {_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SchemaError(f"{where}: unknown field(s) {[u[:40] for u in unknown[:5]]}; allowed: {sorted(fields)}")
    required = {n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise SchemaError(f"{where}: missing field(s) {missing}")
    hints = typing.get_type_hints(cls)
    values = {k: _value(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # the dataclass's own range checks (__post_init__)
        raise SchemaError(f"{where}: {err}") from None


def _value(hint: Any, v: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return parse(hint, v, where)
    if hint is bool:
        if type(v) is not bool:
            raise SchemaError(f"{where} must be true or false, got {_kind(v)}")
        return v
    if hint is int:
        if type(v) is not int or abs(v) > MAX_INT:
            raise SchemaError(f"{where} must be an integer within ±2**53 (not a bool or a float), got {_kind(v)}")
        return v
    if hint is float:
        if type(v) not in (int, float) or not math.isfinite(v) or abs(v) > MAX_INT:
            raise SchemaError(f"{where} must be a finite number, got {_kind(v)}")
        return float(v)
    if hint is str:
        if type(v) is not str or len(v) > MAX_STR or not v.isprintable():
            raise SchemaError(f"{where} must be a printable string of at most {MAX_STR} characters, got {_kind(v)}")
        return v
    if hint is type(None):
        if v is not None:
            raise SchemaError(f"{where} must be null, got {_kind(v)}")
        return v
    if origin is typing.Literal:
        if not any(type(v) is type(a) and v == a for a in args):
            raise SchemaError(f"{where} must be one of {list(args)}, got {_kind(v)}")
        return v
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _value(option, v, where)
            except SchemaError:
                pass
        raise SchemaError(f"{where} must be one of {[getattr(a, '__name__', str(a)) for a in args]}, got {_kind(v)}")
    if origin is tuple:
        if type(v) not in (list, tuple) or len(v) > MAX_ITEMS:
            raise SchemaError(f"{where} must be a list of at most {MAX_ITEMS} items, got {_kind(v)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
        if len(v) != len(args):
            raise SchemaError(f"{where} must be a list of {len(args)} items, got {len(v)}")
        return tuple(_value(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
    if origin is dict:
        if type(v) is not dict or len(v) > MAX_ITEMS:
            raise SchemaError(f"{where} must be a JSON object of at most {MAX_ITEMS} entries, got {_kind(v)}")
        return {_value(args[0], k, f"{where} key"): _value(args[1], x, f"{where}[{k[:40]!r}]") for k, x in v.items()}
    if hint is Any:
        return _value(FreeValue, v, where)
    raise TypeError(f"schema: no rule for {hint!r} at {where}")  # a programming error, not bad input


def _kind(v: Any) -> str:
    """A short, safe description of a received value (never the whole of a 4 MB string)."""
    text = ascii(v)
    return f"{text[:60]}{'…' if len(text) > 60 else ''} ({type(v).__name__})"
