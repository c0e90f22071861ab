"""`--traces`: Jaeger planned on loopback, and every other process told (by the standard OTEL_*
variables) to export to it, as a service of its own; a variable the environment sets wins."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from services.supervisor import plan
from services.supervisor.app import Supervised, SupervisorSettings
from services.supervisor.plan import STAGE_CONTROL, Ports, ProcessSpec, plan_jaeger

SETTINGS = SupervisorSettings(
    traces=True,
    jaeger_otlp_listen="127.0.0.1:4417",
    jaeger_query_listen="127.0.0.1:16786",
    trace_sample_ratio=0.1,
)


def test_every_process_exports_to_the_mesh_jaeger_as_its_own_service() -> None:
    store = SETTINGS.trace_store()
    assert store is not None
    assert store.env("model-diabetes-go") == {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4417",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
        "OTEL_BSP_SCHEDULE_DELAY": "500",
        "OTEL_SERVICE_NAME": "model-diabetes-go",
    }
    assert store.facts() == {
        "query_url": "http://127.0.0.1:16786",
        "otlp_endpoint": "http://127.0.0.1:4417",
    }
    assert SupervisorSettings().trace_store() is None


def test_jaeger_is_planned_first_on_loopback_and_exports_nothing_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SETTINGS.trace_store()
    assert store is not None
    monkeypatch.setattr(plan, "REPO_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="make setup"):
        plan_jaeger(tmp_path, store, Ports())
    (tmp_path / "tools" / "bin").mkdir(parents=True)
    (tmp_path / "tools" / "bin" / "jaeger").touch()
    spec = plan_jaeger(tmp_path, store, Ports())
    assert spec.stage < STAGE_CONTROL
    assert spec.command == [
        str(tmp_path / "tools/bin/jaeger"),
        "--config",
        str(tmp_path / "deploy/jaeger/local.yaml"),
    ]
    assert spec.env["RDV_JAEGER_OTLP_GRPC"] == "127.0.0.1:4417"
    assert spec.env["RDV_JAEGER_QUERY_HTTP"] == "127.0.0.1:16786"
    listens = [v for k, v in spec.env.items() if k != "RDV_JAEGER_MAX_TRACES"]
    assert all(v.startswith("127.0.0.1:") for v in listens)
    # Health is what the supervisor checks; no ready file, and no spans of its own to us.
    assert spec.endpoint == spec.env["RDV_JAEGER_HEALTH"]
    assert not spec.writes_ready_file and not spec.traced


async def test_a_started_process_gets_the_trace_environment_unless_already_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    dumped = tmp_path / "env.txt"
    spec = ProcessSpec(
        name="model-x",
        module="",
        stage=1,
        env={},
        endpoint="127.0.0.1:1",
        ready_file=tmp_path / "ready.json",
        log_file=tmp_path / "x.log",
        command=[
            sys.executable,
            "-c",
            f"import os, json; open({str(dumped)!r}, 'w').write(json.dumps(dict(os.environ)))",
        ],
    )
    process = Supervised(spec, SETTINGS, SETTINGS.trace_store())
    await process.start()
    assert process.process is not None
    await process.process.wait()
    await process.stop()
    env = json.loads(dumped.read_text())
    assert env["OTEL_SERVICE_NAME"] == "model-x"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4417"
    # The operator's own setting wins over the supervisor's.
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.5"
