"""`redact_pii` clears every field marked `(rendezvous.v1.pii) = true`: at the top, in nested
messages, in repeated messages and in map values, and in recursive types; it lists what it
cleared and leaves everything else as it was.

The nesting the real contract does not (yet) have is exercised with a test-only proto built
here, in the default pool, with the real `pii` option on its fields.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from rendezvous.v1 import options_pb2, scoring_pb2, task_pb2

from services.core.protos import redact_pii, set_values

_PACKAGE = "rendezvous.test.pii"
_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL


def _field(
    message: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    kind: int = _STRING,
    *,
    type_name: str = "",
    repeated: bool = False,
    pii: bool = False,
) -> None:
    field = message.field.add(
        name=name, number=number, type=kind, label=_REPEATED if repeated else _OPTIONAL
    )
    if type_name:
        field.type_name = type_name
    if pii:
        field.options.Extensions[options_pb2.pii] = True


def _build() -> tuple[Any, Any]:
    """Classes of `Inner {secret (pii), keep, Inner child}` and `Outer {name (pii), note,
    Inner one, repeated Inner items, map<string, Inner> by_key, map<string, string> tags}`."""
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName(f"{_PACKAGE}.Outer")
    except KeyError:
        file = descriptor_pb2.FileDescriptorProto(
            name="rendezvous/test/pii_test.proto",
            package=_PACKAGE,
            syntax="proto3",
            dependency=["rendezvous/v1/options.proto"],
        )
        inner = file.message_type.add(name="Inner")
        _field(inner, "secret", 1, pii=True)
        _field(inner, "keep", 2)
        _field(inner, "child", 3, _MESSAGE, type_name=f".{_PACKAGE}.Inner")
        outer = file.message_type.add(name="Outer")
        _field(outer, "name", 1, pii=True)
        _field(outer, "note", 2)
        _field(outer, "one", 3, _MESSAGE, type_name=f".{_PACKAGE}.Inner")
        _field(outer, "items", 4, _MESSAGE, type_name=f".{_PACKAGE}.Inner", repeated=True)
        for number, (map_name, entry, value_type) in enumerate(
            [("by_key", "ByKeyEntry", _MESSAGE), ("tags", "TagsEntry", _STRING)], start=5
        ):
            map_entry = outer.nested_type.add(name=entry)
            map_entry.options.map_entry = True
            _field(map_entry, "key", 1)
            _field(
                map_entry,
                "value",
                2,
                value_type,
                type_name=f".{_PACKAGE}.Inner" if value_type == _MESSAGE else "",
            )
            _field(
                outer,
                map_name,
                number,
                _MESSAGE,
                type_name=f".{_PACKAGE}.Outer.{entry}",
                repeated=True,
            )
        pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Inner")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Outer")),
    )


def test_every_nesting_is_redacted_and_listed() -> None:
    inner_class, outer_class = _build()
    outer = outer_class(name="MARK-top", note="stays")
    outer.one.secret = "MARK-one"
    outer.one.keep = "kept"
    outer.one.child.secret = "MARK-deep"
    outer.items.add(secret="MARK-item-0", keep="k0")
    outer.items.add(keep="k1")  # nothing to hide: not listed
    outer.items.add(secret="MARK-item-2")
    outer.by_key["a"].CopyFrom(inner_class(secret="MARK-map-a", keep="ka"))
    outer.by_key["b"].child.secret = "MARK-map-b-child"
    outer.tags["t"] = "plain"

    redacted = redact_pii(outer)

    assert sorted(redacted) == sorted(
        [
            "name",
            "one.secret",
            "one.child.secret",
            "items[0].secret",
            "items[2].secret",
            "by_key[a].secret",
            "by_key[b].child.secret",
        ]
    )
    assert b"MARK" not in outer.SerializeToString()
    assert outer.note == "stays"
    assert outer.one.keep == "kept"
    assert [item.keep for item in outer.items] == ["k0", "k1", ""]
    assert outer.by_key["a"].keep == "ka"
    assert dict(outer.tags) == {"t": "plain"}


def test_prefix_and_an_empty_message() -> None:
    _, outer_class = _build()
    assert redact_pii(outer_class()) == []
    assert redact_pii(outer_class(name="x"), "record.") == ["record.name"]


def test_the_contracts_pii_fields() -> None:
    request = scoring_pb2.ScoreRequest(objective="demo", subject_id="MARK-subject")
    set_values(request.features, {"x": 1.0, "nested": {"subject_id": "a feature, not pii"}})
    record = task_pb2.ArchiveRecord(
        task=task_pb2.EnrichedTask(task=task_pb2.ScoringTask(request=request))
    )
    assert redact_pii(record) == ["task.task.request.subject_id"]
    assert record.task.task.request.features["x"].number_value == 1.0

    event = task_pb2.SubjectEvent(subject_id="MARK-subject", kind="view")
    assert redact_pii(event) == ["subject_id"]
    assert event.kind == "view"
    # Messages with no PII anywhere are left alone.
    outcome = task_pb2.Outcome(request_id="r1")
    assert redact_pii(outcome) == []
    assert outcome.request_id == "r1"
