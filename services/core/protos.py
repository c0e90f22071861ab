"""Small helpers over the generated messages: JSON values, time, clearing marked fields
(PII redaction, the readable copy of a sealed record)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from rendezvous.v1 import options_pb2

_PII = options_pb2.pii
_SUBJECT_DATA = options_pb2.subject_data


def to_value(value: Any) -> struct_pb2.Value:
    """A google.protobuf.Value from a plain Python/JSON value."""
    out = struct_pb2.Value()
    if value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int | float):
        out.number_value = float(value)
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, Mapping):
        out.struct_value.update(value)
    elif isinstance(value, Iterable):
        out.list_value.extend(list(value))
    else:
        raise TypeError(f"not a JSON value: {type(value).__name__}")
    return out


def from_value(value: struct_pb2.Value) -> Any:
    """The plain Python value a google.protobuf.Value holds."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: from_value(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [from_value(v) for v in value.list_value.values]
    return None


def set_values(target: Any, values: Mapping[str, Any]) -> None:
    """Fill a `map<string, google.protobuf.Value>` field from plain values."""
    for key, value in values.items():
        target[key].CopyFrom(to_value(value))


def values_dict(source: Mapping[str, struct_pb2.Value]) -> dict[str, Any]:
    return {key: from_value(value) for key, value in source.items()}


def finite_number(value: struct_pb2.Value) -> float | None:
    """The value as a finite float, or None when it is not a finite number."""
    if value.WhichOneof("kind") != "number_value":
        return None
    number = value.number_value
    return number if math.isfinite(number) else None


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def timestamp_from_ns(epoch_ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(epoch_ns)
    return ts


def seconds_until(deadline: timestamp_pb2.Timestamp, now_ns: int | None = None) -> float:
    """Seconds from now to `deadline` (negative once it has passed)."""
    current = time.time_ns() if now_ns is None else now_ns
    return (deadline.ToNanoseconds() - current) / 1e9


def duration_from_seconds(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def duration_ms(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e6


def redact_pii(message: Message, prefix: str = "") -> list[str]:
    """Clear every field marked `(rendezvous.v1.pii) = true`, recursively, in place: in
    singular, repeated and map-valued messages alike.

    Returns the paths of the fields it cleared (`a.b[2].c`, `a.m[key].c`), so sinks can
    record what they hid. Only fields whose type can hold a marked field are visited (a
    features map of google.protobuf.Value never can), so the walk costs little per message.
    """
    return clear_marked(message, _PII, prefix)


def clear_subject_data(message: Message) -> list[str]:
    """Clear every field marked `(rendezvous.v1.subject_data) = true`, recursively, in place
    (the readable copy around a sealed record); the paths cleared, as `redact_pii` gives."""
    return clear_marked(message, _SUBJECT_DATA)


def clear_marked(message: Message, option: Any, prefix: str = "") -> list[str]:
    """Clear every field whose options set the boolean extension `option`, at any depth."""
    cleared: list[str] = []
    for name, step, is_set in _plan(message.DESCRIPTOR, option):
        if step == _CLEAR:
            if is_set(message):
                message.ClearField(name)
                cleared.append(prefix + name)
        elif step == _ONE:
            if message.HasField(name):
                cleared.extend(clear_marked(getattr(message, name), option, f"{prefix}{name}."))
        elif step == _MANY:
            for index, item in enumerate(getattr(message, name)):
                cleared.extend(clear_marked(item, option, f"{prefix}{name}[{index}]."))
        else:
            for key, item in getattr(message, name).items():
                cleared.extend(clear_marked(item, option, f"{prefix}{name}[{key}]."))
    return cleared


# What a walk does with a field: clear it, or look inside one message, each of a repeated
# field's, each of a map's values.
_CLEAR, _ONE, _MANY, _MAP = range(4)
_Step = tuple[str, int, Callable[[Message], bool]]
# (option, message type) -> the fields a walk visits: decided once per type (the walk runs
# per record; visiting every field and reading its options each time cost ~150 us for an
# outcome, the plan ~10 us).
_PLANS: dict[tuple[str, str], tuple[_Step, ...]] = {}
# (option name, message full name) -> whether the message, or a message it contains at any
# depth, has a field marked with the option.
_HOLDS: dict[tuple[str, str], bool] = {}


def _plan(descriptor: Any, option: Any) -> tuple[_Step, ...]:
    key = (option.full_name, descriptor.full_name)
    plan = _PLANS.get(key)
    if plan is None:
        steps: list[_Step] = []
        for field in descriptor.fields:
            nested = field.message_type
            if field.GetOptions().Extensions[option]:
                steps.append((field.name, _CLEAR, _set_check(field)))
            elif nested is None:
                continue
            elif nested.GetOptions().map_entry:
                if _may_hold(nested.fields_by_name["value"].message_type, option):
                    steps.append((field.name, _MAP, _set_check(field)))
            elif _may_hold(nested, option):
                step = _MANY if field.is_repeated else _ONE
                steps.append((field.name, step, _set_check(field)))
        plan = _PLANS[key] = tuple(steps)
    return plan


def _set_check(field: FieldDescriptor) -> Callable[[Message], bool]:
    """Whether the field holds anything (what ListFields would list)."""
    name = field.name
    if field.is_repeated:
        return lambda message: len(getattr(message, name)) > 0
    if field.has_presence:
        return lambda message: message.HasField(name)
    default = field.default_value
    return lambda message: bool(getattr(message, name) != default)


def _may_hold(descriptor: Descriptor | None, option: Any) -> bool:
    if descriptor is None:
        return False
    key = (option.full_name, descriptor.full_name)
    known = _HOLDS.get(key)
    if known is None:
        known = _HOLDS[key] = _search(descriptor, option, set())
    return known


def _search(descriptor: Descriptor, option: Any, seen: set[str]) -> bool:
    """Whether a marked field is reachable from `descriptor` (`seen` breaks recursive types)."""
    seen.add(descriptor.full_name)
    for field in descriptor.fields:
        if field.GetOptions().Extensions[option]:
            return True
        nested = field.message_type
        if nested is not None and nested.full_name not in seen and _search(nested, option, seen):
            return True
    return False
