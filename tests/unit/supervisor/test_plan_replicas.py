"""Rendezvous replicas in the plan (`rendezvous up --rendezvous-replicas N`): a rendezvous
and a collector per replica, each pair with its own instance (so its own return address),
delivery socket and port, started one replica after the other; the mesh file's
`rendezvous` section says where they listen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.cli import build_parser
from services.collector.settings import CollectorSettings
from services.core.mesh import Mesh
from services.core.topics import Topics
from services.rendezvous.settings import RendezvousSettings
from services.rendezvous.warmup import Warmup
from services.supervisor.plan import (
    STAGE_RENDEZVOUS,
    ProcessSpec,
    plan,
)


def _mesh(**rendezvous: Any) -> Mesh:
    return Mesh.model_validate(
        {
            "rendezvous": rendezvous,
            "objectives": {
                "o": {
                    "sla_ms": 50,
                    "models": [{"name": "m", "role": "incumbent", "kind": "sum"}],
                    "policy": [{"until_ms": 40, "accept": ["m"]}],
                }
            },
        }
    )


def _specs(mesh: Mesh, tmp_path: Path, replicas: int | None = None) -> dict[str, ProcessSpec]:
    listens = mesh.rendezvous.replica_listens(replicas)
    specs = plan(mesh.objective_configs(), tmp_path, "pulsar://x", "http://x", listens)
    return {spec.name: spec for spec in specs}


def _settings(spec: ProcessSpec, monkeypatch: pytest.MonkeyPatch, kind: type[Any]) -> Any:
    """The settings the process will read from the environment the plan gives it."""
    for key, value in spec.env.items():
        monkeypatch.setenv(key, value)
    return kind()


def test_replicas_listen_port_step_apart() -> None:
    assert _mesh().rendezvous.replica_listens() == ["127.0.0.1:50051"]
    assert _mesh(replicas=3).rendezvous.replica_listens() == [
        "127.0.0.1:50051",
        "127.0.0.1:50061",
        "127.0.0.1:50071",
    ]
    stepped = _mesh(listen="127.0.0.1:40000", port_step=1)
    assert stepped.rendezvous.replica_listens(2) == ["127.0.0.1:40000", "127.0.0.1:40001"]


@pytest.mark.parametrize(
    ("entry", "replicas", "why"),
    [
        ({"listen": "127.0.0.1:65530"}, 2, "past port"),
        ({"listen": "no-port"}, 2, "host:port"),
        ({}, 0, "1-16"),
    ],
)
def test_replica_addresses_that_cannot_be(entry: dict[str, Any], replicas: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        _mesh(**entry).rendezvous.replica_listens(replicas)


def test_the_mesh_file_bounds_its_replicas() -> None:
    with pytest.raises(ValidationError):
        _mesh(replicas=0)


def test_one_replica_keeps_the_names_of_a_single_rendezvous(tmp_path: Path) -> None:
    specs = _specs(_mesh(), tmp_path)
    assert {"rendezvous", "collector"} <= set(specs)
    assert specs["rendezvous"].env["RDV_RENDEZVOUS_INSTANCE"] == "rdv-0"
    assert specs["rendezvous"].endpoint == "127.0.0.1:50051"
    assert not specs["rendezvous"].replicated and not specs["collector"].replicated


def test_each_replica_has_its_own_collector_return_address_socket_and_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = _specs(_mesh(), tmp_path, replicas=2)
    assert "rendezvous" not in specs and "collector" not in specs
    topics = Topics()
    seen: list[tuple[str, Path, str]] = []
    for replica in (0, 1):
        rendezvous = _settings(specs[f"rendezvous-{replica}"], monkeypatch, RendezvousSettings)
        collector = _settings(specs[f"collector-{replica}"], monkeypatch, CollectorSettings)
        # The pair agrees on the instance (the collector consumes the rendezvous' return
        # address) and on the socket between them.
        assert collector.instance == rendezvous.instance == f"rdv-{replica}"
        assert collector.delivery_socket == rendezvous.delivery_socket
        assert rendezvous.listen == f"127.0.0.1:{50051 + 10 * replica}"
        seen.append(
            (topics.predictions(rendezvous.instance), rendezvous.delivery_socket, rendezvous.listen)
        )
        for name in (f"rendezvous-{replica}", f"collector-{replica}"):
            assert specs[name].stage == STAGE_RENDEZVOUS + replica
            assert specs[name].labels["instance"] == f"rdv-{replica}"
            assert specs[name].latency_critical
            # Restarted, it takes its priority only once ready: the other serves meanwhile.
            assert specs[name].replicated
    # Nothing shared: two return addresses, two sockets, two ports.
    for column in zip(*seen, strict=True):
        assert len(set(column)) == 2
    metrics = {spec.labels["metrics"] for spec in specs.values()}
    assert len(metrics) == len(specs)


def test_up_and_supervise_take_the_replica_count() -> None:
    parser = build_parser()
    assert parser.parse_args(["up", "--rendezvous-replicas", "2"]).rendezvous_replicas == 2
    assert parser.parse_args(["up"]).rendezvous_replicas is None
    supervise = ["supervise", "--mesh", "m", "--pulsar-url", "p", "--pulsar-admin-url", "a"]
    assert parser.parse_args([*supervise, "--rendezvous-replicas", "3"]).rendezvous_replicas == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "--rendezvous-replicas", "0"])


def test_a_replica_restarted_rejoins_with_a_gentler_warm_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = _specs(_mesh(), tmp_path, replicas=2)
    for replica in (0, 1):
        spec = specs[f"rendezvous-{replica}"]
        # Its first start warms up as any rendezvous; a restart runs with restart_env too.
        assert "RDV_RENDEZVOUS_REJOINING" not in spec.env
        monkeypatch.delenv("RDV_RENDEZVOUS_REJOINING", raising=False)
        first = _settings(spec, monkeypatch, RendezvousSettings)
        assert Warmup(first, [], _no_race).rate == first.warmup_rate
        restarted = ProcessSpec(**{**spec.__dict__, "env": {**spec.env, **spec.restart_env}})
        rejoining = _settings(restarted, monkeypatch, RendezvousSettings)
        assert Warmup(rejoining, [], _no_race).rate == rejoining.rejoin_warmup_rate
        assert rejoining.rejoin_warmup_rate < rejoining.warmup_rate
        assert not specs[f"collector-{replica}"].restart_env
    lone = _specs(_mesh(), tmp_path)
    assert not lone["rendezvous"].restart_env


async def _no_race(request: Any) -> float | None:
    return None
