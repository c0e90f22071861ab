"""`validate`: every problem of a configuration, each as a field path and what is wrong."""

from __future__ import annotations

from rendezvous.v1 import common_pb2

from services.control.validation import accepted_models, validate
from services.core.protos import duration_from_seconds
from tests.unit.control.configs import config


def fields(problems: list[tuple[str, str]]) -> list[str]:
    return [field for field, _ in problems]


def test_a_mesh_built_configuration_is_valid() -> None:
    assert validate(config()) == []


def test_unknown_and_decoy_models_in_a_step_are_named_by_position() -> None:
    bad = config()
    bad.policy.steps[1].accept[:] = ["ridge", "nobody", "decoy"]
    problems = validate(bad)
    assert fields(problems) == [
        "config.policy.steps[1].accept[1]",
        "config.policy.steps[1].accept[2]",
    ]
    assert "'nobody' is not a model" in problems[0][1]
    assert "decoy" in problems[1][1]


def test_deadlines_must_increase_and_end_within_the_sla() -> None:
    bad = config()
    bad.policy.steps[1].until.CopyFrom(duration_from_seconds(0.010))
    assert fields(validate(bad)) == ["config.policy.steps[1].until"]
    late = config()
    late.policy.steps[1].until.CopyFrom(duration_from_seconds(0.060))
    problems = validate(late)
    assert fields(problems) == ["config.policy.steps[1].until"]
    assert "past the SLA (50 ms)" in problems[0][1]


def test_sla_must_be_positive() -> None:
    bad = config()
    bad.sla.CopyFrom(duration_from_seconds(0))
    assert "config.sla" in fields(validate(bad))


def test_exactly_one_enabled_incumbent() -> None:
    none = config()
    none.models[0].role = common_pb2.MODEL_ROLE_CHALLENGER
    assert fields(validate(none)) == ["config.models"]
    two = config()
    two.models[1].role = common_pb2.MODEL_ROLE_INCUMBENT
    assert fields(validate(two)) == ["config.models[1].role"]
    disabled = config()
    disabled.models[0].enabled = False
    assert fields(validate(disabled)) == ["config.models[0].enabled"]


def test_shares_in_range_summing_to_at_most_one_for_accepted_models() -> None:
    bad = config()
    step = bad.policy.steps[1]
    step.shares["sum"] = 1.5
    step.shares["flaky"] = 0.2
    problems = dict(validate(bad))
    assert set(problems) == {
        "config.policy.steps[1].shares[sum]",
        "config.policy.steps[1].shares[flaky]",
    }
    over = config()
    over.policy.steps[1].shares["sum"] = 0.6
    over.policy.steps[1].shares["canary"] = 0.6
    assert fields(validate(over)) == ["config.policy.steps[1].shares"]
    exact = config()
    exact.policy.steps[1].shares["sum"] = 0.7
    exact.policy.steps[1].shares["canary"] = 0.3
    assert validate(exact) == []


def test_sampling_fractions_in_range() -> None:
    bad = config()
    bad.sampling.challenger_fraction = -0.1
    bad.sampling.archive_fraction = float("nan")
    assert fields(validate(bad)) == [
        "config.sampling.challenger_fraction",
        "config.sampling.archive_fraction",
    ]


def test_model_names_are_unique_and_well_formed() -> None:
    bad = config()
    bad.models[2].name = "sum"
    bad.models[3].name = "Bad Name"
    problems = fields(validate(bad))
    assert "config.models[2].name" in problems
    assert "config.models[3].name" in problems


def test_a_change_names_its_author_and_reason() -> None:
    bad = config()
    bad.change.author = ""
    bad.change.reason = "  "
    assert fields(validate(bad)) == ["config.change.author", "config.change.reason"]
    assert validate(bad, require_change=False) == []


def test_every_problem_is_reported_at_once() -> None:
    bad = config()
    bad.sla.CopyFrom(duration_from_seconds(0.040))
    bad.policy.steps[0].accept[:] = ["ghost"]
    bad.sampling.archive_fraction = 2
    bad.change.reason = ""
    assert fields(validate(bad)) == [
        "config.policy.steps[0].accept[0]",
        "config.policy.steps[1].until",
        "config.sampling.archive_fraction",
        "config.change.reason",
    ]


def test_accepted_models_is_every_step() -> None:
    assert accepted_models(config()) == {"ridge", "sum", "canary"}
    assert accepted_models(None) == set()


def test_a_command_and_an_endpoint_exclude_each_other() -> None:
    both = config()
    both.models[1].command[:] = ["tools/bin/rendezvous-model-go"]
    both.models[1].endpoint = "127.0.0.1:7000"
    problems = validate(both)
    assert fields(problems) == ["config.models[1].command"]
    assert "give one of them" in problems[0][1]
    blank = config()
    blank.models[1].command[:] = [" "]
    assert fields(validate(blank)) == ["config.models[1].command"]
