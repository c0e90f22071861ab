"""What the supervisor tells a Prometheus to scrape: every process's metrics endpoint, named,
and the broker's, in file_sd form; and what `rendezvous status --metrics` prints from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services import cli
from services.core.mesh import ObjectiveEntry, to_config
from services.supervisor.app import PROMETHEUS_TARGETS, Supervised, Supervisor, SupervisorSettings
from services.supervisor.plan import plan

OBJECTIVE = ObjectiveEntry.model_validate(
    {
        "sla_ms": 50,
        "features": [{"name": "x"}],
        "models": [{"name": "inc", "role": "incumbent", "kind": "sum"}],
        "policy": [{"until_ms": 40, "accept": ["inc"]}],
        "default": {"score": 0.0},
    }
)


def _supervisor(tmp_path: Path) -> Supervisor:
    specs = plan(
        {"o": to_config("o", OBJECTIVE)},
        tmp_path,
        "pulsar://127.0.0.1:6695",
        "http://127.0.0.1:8195",
        "127.0.0.1:0",
    )
    supervisor = Supervisor(
        [],
        tmp_path / "state.json",
        facts={"pulsar_admin_url": "http://127.0.0.1:8195", "endpoint": "127.0.0.1:0"},
        settings=SupervisorSettings(),
    )
    supervisor.processes = [Supervised(spec, supervisor.settings) for spec in specs]
    return supervisor


def test_every_process_and_the_broker_is_a_named_target(tmp_path: Path) -> None:
    supervisor = _supervisor(tmp_path)
    supervisor.write_state()
    groups = json.loads((tmp_path / PROMETHEUS_TARGETS).read_text())
    by_name = {group["labels"]["component"]: group for group in groups}
    planned = {spec.name: spec for spec in (p.spec for p in supervisor.processes)}
    assert set(by_name) == {*planned, "pulsar"}
    for name, spec in planned.items():
        # The port the process was told to serve metrics on (RDV_<SERVICE>_METRICS_PORT).
        port = next(v for k, v in spec.env.items() if k.endswith("_METRICS_PORT"))
        assert by_name[name]["targets"] == [f"127.0.0.1:{port}"]
    assert by_name["pulsar"] == {
        "targets": ["127.0.0.1:8195"],
        "labels": {"component": "pulsar", "__metrics_path__": "/metrics/", "__scheme__": "http"},
    }


def test_status_metrics_lists_each_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = _supervisor(tmp_path)
    supervisor.write_state()
    state = json.loads((tmp_path / "state.json").read_text())
    monkeypatch.setattr(cli, "_alive", lambda pid: True)

    async def healthy(endpoint: str, **_: object) -> bool:
        return True

    monkeypatch.setattr("services.supervisor.app.check_health", healthy)
    assert cli.main(["--state-dir", str(tmp_path), "status", "--metrics"]) == 0
    lines = capsys.readouterr().out.splitlines()
    urls = dict(line.split() for line in lines[1 : len(state["processes"]) + 2])
    assert urls["pulsar"] == "http://127.0.0.1:8195/metrics/"
    for process in state["processes"]:
        assert urls[process["name"]] == f"http://{process['metrics']}/metrics"
