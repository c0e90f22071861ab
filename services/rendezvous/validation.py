"""Checks a ScoreRequest against its objective, naming every offending field."""

from __future__ import annotations

import re

from rendezvous.v1 import model_pb2, objective_pb2, scoring_pb2

from services.core.errors import InvalidArgument
from services.core.protos import finite_number
from services.rendezvous.settings import RendezvousSettings

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]+$")
_KIND_BY_TYPE = {
    model_pb2.FEATURE_TYPE_STRING: ("string_value", "a string"),
    model_pb2.FEATURE_TYPE_BOOL: ("bool_value", "a boolean"),
    model_pb2.FEATURE_TYPE_LIST: ("list_value", "a list"),
}


def validate(
    request: scoring_pb2.ScoreRequest,
    config: objective_pb2.ObjectiveConfig,
    settings: RendezvousSettings,
) -> None:
    """Raise InvalidArgument listing every problem, or return for a valid request."""
    violations: list[tuple[str, str]] = []
    if request.request_id:
        if len(request.request_id) > settings.request_id_max_length:
            violations.append(
                ("request_id", f"longer than {settings.request_id_max_length} characters")
            )
        elif not _REQUEST_ID.match(request.request_id):
            violations.append(("request_id", "may contain only letters, digits and . _ : -"))
    if len(request.subject_id) > settings.subject_id_max_length:
        violations.append(
            ("subject_id", f"longer than {settings.subject_id_max_length} characters")
        )
    if len(request.features) > settings.max_features:
        violations.append(("features", f"more than {settings.max_features} features"))
    elif config.features:
        violations.extend(_feature_violations(request, config))
    if violations:
        raise InvalidArgument(violations)


def _feature_violations(
    request: scoring_pb2.ScoreRequest, config: objective_pb2.ObjectiveConfig
) -> list[tuple[str, str]]:
    violations: list[tuple[str, str]] = []
    known = {spec.name for spec in config.features}
    for spec in config.features:
        path = f"features.{spec.name}"
        if spec.name not in request.features:
            if spec.required:
                violations.append((path, "required feature is missing"))
            continue
        value = request.features[spec.name]
        if spec.type == model_pb2.FEATURE_TYPE_NUMBER:
            if finite_number(value) is None:
                violations.append((path, "must be a finite number"))
        elif spec.type in _KIND_BY_TYPE:
            kind, described = _KIND_BY_TYPE[spec.type]
            if value.WhichOneof("kind") != kind:
                violations.append((path, f"must be {described}"))
    for name in sorted(set(request.features) - known):
        violations.append((f"features.{name}", f"not a feature of objective {config.objective!r}"))
    return violations
