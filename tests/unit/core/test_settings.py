"""Where a service's settings come from: arguments, env vars, its YAML section, defaults."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from services.core.settings import CONFIG_FILE_ENV, ServiceSettings


class ProbeSettings(ServiceSettings):
    """A service of its own, so no other service's env vars or sections interfere."""

    model_config = SettingsConfigDict(env_prefix="RDV_PROBE_")
    config_section: ClassVar[str] = "probe"

    listen: str = "default:1"


LAYERS = ("init", "env", "yaml")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    for name in ("RDV_PROBE_LISTEN", "RDV_PROBE_PULSAR__SEND_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)


def config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str) -> None:
    path = tmp_path / "rendezvous.yaml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv(CONFIG_FILE_ENV, str(path))


@pytest.mark.parametrize(
    "given",
    [combo for n in range(len(LAYERS) + 1) for combo in itertools.combinations(LAYERS, n)],
    ids=lambda combo: "+".join(combo) or "none",
)
def test_the_highest_layer_given_wins(
    given: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    init: dict[str, Any] = {}
    if "init" in given:
        init["listen"] = "init:1"
    if "env" in given:
        monkeypatch.setenv("RDV_PROBE_LISTEN", "env:1")
    if "yaml" in given:
        config_file(monkeypatch, tmp_path, "probe:\n  listen: yaml:1\n")
    expected = next((f"{layer}:1" for layer in LAYERS if layer in given), "default:1")
    assert ProbeSettings(**init).listen == expected


def test_nested_fields_merge_across_layers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config_file(
        monkeypatch,
        tmp_path,
        "probe:\n  pulsar:\n    service_url: pulsar://yaml:6650\n    send_timeout_s: 1.5\n",
    )
    monkeypatch.setenv("RDV_PROBE_PULSAR__SEND_TIMEOUT_S", "2.5")
    settings = ProbeSettings()
    assert settings.pulsar.service_url == "pulsar://yaml:6650"
    assert settings.pulsar.send_timeout_s == 2.5
    assert settings.pulsar.operation_timeout_s == 10.0


@pytest.mark.parametrize(
    "text",
    ["", "other:\n  listen: other:1\n", "probe:\n", "probe: {}\n"],
    ids=["empty-file", "no-section", "empty-section", "empty-mapping"],
)
def test_a_missing_section_reads_as_empty(
    text: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file(monkeypatch, tmp_path, text)
    assert ProbeSettings().listen == "default:1"


def test_a_missing_file_reads_as_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "absent.yaml"))
    assert ProbeSettings().listen == "default:1"


def test_only_this_services_section_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file(monkeypatch, tmp_path, "probe:\n  listen: mine:1\nother:\n  listen: theirs:1\n")
    assert ProbeSettings().listen == "mine:1"
    assert ServiceSettings().listen == "127.0.0.1:0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("probe:\n  listen: [unclosed\n", "is not valid YAML"),
        ("- probe\n- other\n", "must map service names to mappings of settings"),
        ("probe: 5\n", "must map service names to mappings of settings"),
    ],
    ids=["syntax", "top-level-list", "scalar-section"],
)
def test_a_malformed_file_names_itself(
    text: str, message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file(monkeypatch, tmp_path, text)
    with pytest.raises(ValueError, match=message) as caught:
        ProbeSettings()
    assert str(tmp_path / "rendezvous.yaml") in str(caught.value)


def test_an_unknown_setting_in_the_section_is_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file(monkeypatch, tmp_path, "probe:\n  lisen: typo:1\n")
    with pytest.raises(ValidationError, match="lisen"):
        ProbeSettings()


def test_metrics_bind_loopback_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (ProbeSettings().metrics_host, ProbeSettings().metrics_port) == ("127.0.0.1", 0)
    monkeypatch.setenv("RDV_PROBE_METRICS_HOST", "0.0.0.0")
    monkeypatch.setenv("RDV_PROBE_METRICS_PORT", "9464")
    probe = ProbeSettings()
    assert (probe.metrics_host, probe.metrics_port) == ("0.0.0.0", 9464)
    monkeypatch.setenv("RDV_PROBE_METRICS_PORT", "70000")
    with pytest.raises(ValidationError):
        ProbeSettings()
