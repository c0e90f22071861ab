"""tools/chart_check.py finds what makes a rendered release unfit for the code.

`make helm-check` runs it on the chart's real renderings; here a small release written out
by hand passes, and each way of breaking it is named.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tools.chart_check import Release, check

MESH: dict[str, Any] = {
    "objectives": {
        "demo": {
            "sla_ms": 50,
            "models": [
                {"name": "ridge", "role": "incumbent", "kind": "diabetes"},
                {"name": "decoy", "role": "decoy"},
            ],
            "policy": [{"until_ms": 45, "accept": ["ridge"]}],
        }
    }
}
SOCKET = "/var/run/rendezvous/delivery/delivery.sock"


def _pod_name(variable: str) -> dict[str, Any]:
    return {"name": variable, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}


def _container(
    name: str, module: str, env: dict[str, str], *extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "command": ["python", "-m", module],
        "env": [*extra, *({"name": k, "value": v} for k, v in env.items())],
        "ports": [{"name": "grpc", "containerPort": 50051}],
        "readinessProbe": {"grpc": {"port": 50051}},
        "resources": {
            "requests": {"cpu": "1", "memory": "1Gi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "securityContext": {"runAsUser": 10001},
        "volumeMounts": [{"name": "delivery", "mountPath": "/var/run/rendezvous"}],
    }


def _deployment(
    name: str, containers: list[dict[str, Any]], init: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": containers, "enableServiceLinks": False}
    if init:
        spec["initContainers"] = init
    return {"kind": "Deployment", "metadata": {"name": name}, "spec": {"template": {"spec": spec}}}


def release() -> list[dict[str, Any]]:
    runner_env = {
        "RDV_RUNNER_OBJECTIVE": "demo",
        "RDV_RUNNER_FOLLOW": "true",
        "RDV_RUNNER_REPLICAS": "1",
        "RDV_RUNNER_SUBSCRIPTION": "runners",
        "RDV_RUNNER_PULSAR__ADMIN_URL": "http://pulsar:8080",
    }
    return [
        {
            "kind": "ConfigMap",
            "metadata": {"name": "config"},
            "data": {
                "mesh.yaml": yaml.safe_dump(MESH),
                "models.json": json.dumps({"ridge": "model-ridge.ns.svc:50051"}),
            },
        },
        {
            "kind": "Service",
            "metadata": {"name": "model-ridge"},
            "spec": {"ports": [{"port": 50051}]},
        },
        _deployment(
            "rendezvous",
            [
                _container(
                    "rendezvous",
                    "services.rendezvous",
                    {"RDV_RENDEZVOUS_DELIVERY_SOCKET": SOCKET},
                    _pod_name("RDV_RENDEZVOUS_INSTANCE"),
                )
            ],
            [
                _container(
                    "collector",
                    "services.collector",
                    {"RDV_COLLECTOR_DELIVERY_SOCKET": SOCKET},
                    _pod_name("RDV_COLLECTOR_INSTANCE"),
                )
            ],
        ),
        _deployment(
            "model-ridge", [_container("model", "services.models", {"RDV_MODEL_KIND": "diabetes"})]
        ),
        _deployment("runners", [_container("runner", "services.runner", runner_env)]),
        {
            "kind": "ScaledObject",
            "metadata": {"name": "runners"},
            "spec": {
                "scaleTargetRef": {"name": "runners"},
                "triggers": [
                    {
                        "type": "pulsar",
                        "metadata": {
                            "adminURL": "http://pulsar:8080",
                            "topic": "persistent://public/default/rdv.demo.tasks",
                            "subscription": "runners",
                        },
                    }
                ],
            },
        },
    ]


def _find(objects: list[dict[str, Any]], name: str, kind: str = "Deployment") -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def _containers(objects: list[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    spec = _find(objects, name)["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name] + [
        {"name": name, "value": value}
    ]


def test_a_release_that_fits_passes() -> None:
    assert check(Release("fits", release())) == []


def _unknown_setting(o: list[dict[str, Any]]) -> None:
    _set_env(_containers(o, "runners")["runner"], "RDV_RUNNER_MAX_BACH", "8")


def _bad_value(o: list[dict[str, Any]]) -> None:
    _set_env(_containers(o, "runners")["runner"], "RDV_RUNNER_MAX_BATCH", "eight")


def _other_service_prefix(o: list[dict[str, Any]]) -> None:
    _set_env(_containers(o, "runners")["runner"], "RDV_MODEL_KIND", "sum")


def _missing_module(o: list[dict[str, Any]]) -> None:
    _containers(o, "runners")["runner"]["command"] = ["python", "-m", "services.runners"]


def _burstable_collector(o: list[dict[str, Any]]) -> None:
    _containers(o, "rendezvous")["collector"]["resources"]["limits"]["cpu"] = "2"


def _other_socket(o: list[dict[str, Any]]) -> None:
    _set_env(
        _containers(o, "rendezvous")["collector"], "RDV_COLLECTOR_DELIVERY_SOCKET", "/tmp/x.sock"
    )


def _other_user(o: list[dict[str, Any]]) -> None:
    _containers(o, "rendezvous")["collector"]["securityContext"]["runAsUser"] = 1000


def _fixed_instance(o: list[dict[str, Any]]) -> None:
    collector = _containers(o, "rendezvous")["collector"]
    collector["env"] = [e for e in collector["env"] if e["name"] != "RDV_COLLECTOR_INSTANCE"]
    _set_env(collector, "RDV_COLLECTOR_INSTANCE", "rdv-0")


def _no_model_container(o: list[dict[str, Any]]) -> None:
    _find(o, "config", "ConfigMap")["data"]["models.json"] = "{}"


def _wrong_group(o: list[dict[str, Any]]) -> None:
    _set_env(_containers(o, "runners")["runner"], "RDV_RUNNER_REPLICAS", "2")


def _double_archive(o: list[dict[str, Any]]) -> None:
    o.append(
        _deployment(
            "decoy", [_container("decoy", "services.decoy", {"RDV_DECOY_OBJECTIVE": "demo"})]
        )
    )


def _keda_elsewhere(o: list[dict[str, Any]]) -> None:
    _find(o, "runners", "ScaledObject")["spec"]["triggers"][0]["metadata"]["subscription"] = "decoy"


def _keda_and_replicas(o: list[dict[str, Any]]) -> None:
    _find(o, "runners")["spec"]["replicas"] = 1


def _probe_port(o: list[dict[str, Any]]) -> None:
    _containers(o, "model-ridge")["model"]["readinessProbe"] = {"grpc": {"port": 50099}}


def _service_links(o: list[dict[str, Any]]) -> None:
    del _find(o, "model-ridge")["spec"]["template"]["spec"]["enableServiceLinks"]


def _bad_mesh(o: list[dict[str, Any]]) -> None:
    mesh = copy.deepcopy(MESH)
    mesh["objectives"]["demo"]["policy"][0]["accept"] = ["nobody"]
    _find(o, "config", "ConfigMap")["data"]["mesh.yaml"] = yaml.safe_dump(mesh)


BREAKAGES: dict[str, tuple[Callable[[list[dict[str, Any]]], None], str]] = {
    "unknown setting": (_unknown_setting, "RDV_RUNNER_MAX_BACH names no field of RunnerSettings"),
    "bad value": (_bad_value, "does not build RunnerSettings"),
    "another service's variable": (
        _other_service_prefix,
        "RDV_MODEL_KIND is not a RunnerSettings variable",
    ),
    "missing module": (_missing_module, "services.runners, which has no __main__"),
    "burstable collector": (_burstable_collector, "collector: requests must equal limits"),
    "two sockets": (_other_socket, "must name one delivery socket"),
    "two users": (_other_user, "must run as one user"),
    "fixed instance": (_fixed_instance, "the instance must be the pod's name"),
    "no model container": (_no_model_container, "ridge has no container and no endpoint"),
    "no host for the group": (_wrong_group, "no runner host serves ridge (group 1)"),
    "archived twice": (_double_archive, "archived by 2 writers"),
    "KEDA on another subscription": (_keda_elsewhere, "KEDA watches another subscription"),
    "KEDA and fixed replicas": (
        _keda_and_replicas,
        "a KEDA-scaled Deployment must not set replicas",
    ),
    "probe on a closed port": (_probe_port, "readinessProbe asks port 50099"),
    "service links": (_service_links, "model-ridge: enableServiceLinks must be false"),
    "mesh that does not load": (_bad_mesh, "the mesh file does not load"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_breakage_is_named(breakage: str) -> None:
    objects = release()
    breaks, expected = BREAKAGES[breakage]
    breaks(objects)
    problems = check(Release(breakage, objects))
    assert any(expected in problem for problem in problems), problems
