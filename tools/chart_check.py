"""What kubeconform cannot see in the rendered chart: that it fits this code base.

`make helm-check` renders deploy/helm/rendezvous (`helm template`), validates every manifest
against the Kubernetes and KEDA schemas (kubeconform), then runs this on the same files.
Each rendered release must:

- run only modules that exist (`python -m services.<name>` has a `__main__`);
- set only settings that exist: every `RDV_<SERVICE>_*` variable of a Python container names
  a field (nested ones joined by `__`) of the settings class its module reads, and the
  container's whole environment builds that settings object (types, required fields, the
  validators' rules), as the process would at start;
- keep the answer path Guaranteed (every container of the rendezvous pod, its collector
  sidecar included, has requests equal to limits) and the delivery socket shared (one
  volume, one socket path, one user, both instances the pod's name);
- serve its mesh: the mesh file parses (services.core.mesh); every enabled model that
  answers has a container or an endpoint; every replica group has runner hosts with that
  group's replicas and subscription; the decoy's archive is written exactly once (a runner
  host of its group or a standalone decoy, not both); the model directory points at the
  model Services' ports;
- scale what exists: KEDA's topic and subscription are its runner hosts', and every
  autoscaler names a Deployment of the release; probes ask ports the containers open.

    python -m tools.chart_check RENDERED.yaml [...]
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings

from services.collector.settings import CollectorSettings
from services.control.settings import ControlSettings
from services.core.mesh import Mesh
from services.core.settings import REPO_ROOT
from services.decoy.settings import DecoySettings
from services.enricher.settings import EnricherSettings
from services.evaluator.settings import EvaluatorSettings
from services.models.settings import ModelSettings
from services.rendezvous.settings import RendezvousSettings
from services.runner.settings import RunnerSettings, group_subscription

SETTINGS: dict[str, type[BaseSettings]] = {
    "services.collector": CollectorSettings,
    "services.control": ControlSettings,
    "services.decoy": DecoySettings,
    "services.enricher": EnricherSettings,
    "services.evaluator": EvaluatorSettings,
    "services.models": ModelSettings,
    "services.rendezvous": RendezvousSettings,
    "services.runner": RunnerSettings,
}
# Settings the chart sets ahead of the code that reads them: accepted by name only, until
# the field exists (none now: METRICS_HOST is ServiceSettings.metrics_host).
PENDING_FIELDS: set[str] = set()
# What a `valueFrom` variable (the pod's name) reads as when the settings are built here.
FIELD_REF_STAND_IN = "rdv-pod-0"
MESH_KEY = "mesh.yaml"
DIRECTORY_KEY = "models.json"


@dataclass
class Release:
    """The manifests of one rendered release, by kind and name."""

    source: str
    objects: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)

    def fail(self, problem: str) -> None:
        self.problems.append(problem)


def load(path: Path) -> Release:
    objects = [doc for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict)]
    return Release(str(path), objects)


def pod_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def python_module(container: dict[str, Any]) -> str | None:
    command = container.get("command", [])
    if len(command) == 3 and command[:2] == ["python", "-m"]:
        return str(command[2])
    return None


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables; those taken from the pod (fieldRef) read as a stand-in."""
    return {
        item["name"]: str(item["value"]) if "value" in item else FIELD_REF_STAND_IN
        for item in container.get("env", [])
    }


def field_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every settable name of a settings model: FIELD, and PARENT__CHILD for nested models."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        key = f"{prefix}{name.upper()}"
        names.add(key)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= field_paths(annotation, f"{key}__")
    return names


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """Only `variables` in os.environ (and no config file) while settings are built."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(variables)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_container_settings(release: Release, where: str, container: dict[str, Any]) -> None:
    module = python_module(container)
    if module is None:
        return
    package = REPO_ROOT.joinpath(*module.split("."))
    if not (package / "__main__.py").is_file():
        release.fail(f"{where}: runs {module}, which has no __main__")
        return
    settings_class = SETTINGS.get(module)
    if settings_class is None:
        release.fail(f"{where}: no settings class known for {module}")
        return
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    env = env_of(container)
    known = field_paths(settings_class) | PENDING_FIELDS
    for name in env:
        if name.startswith("RDV_") and not name.startswith(prefix):
            release.fail(f"{where}: {name} is not a {settings_class.__name__} variable ({prefix}*)")
        elif name.startswith(prefix) and name[len(prefix) :] not in known:
            release.fail(f"{where}: {name} names no field of {settings_class.__name__}")
    pending = {f"{prefix}{name}" for name in PENDING_FIELDS} - {
        f"{prefix}{name}" for name in field_paths(settings_class)
    }
    with environment({k: v for k, v in env.items() if k not in pending}):
        try:
            settings_class()
        except (ValidationError, ValueError) as error:
            release.fail(
                f"{where}: its environment does not build {settings_class.__name__}: {error}"
            )


def resources_guaranteed(container: dict[str, Any]) -> bool:
    resources = container.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    return all(
        key in limits and str(requests.get(key, limits[key])) == str(limits[key])
        for key in ("cpu", "memory")
    )


def check_answer_path(release: Release, workload: dict[str, Any]) -> None:
    name = workload["metadata"]["name"]
    containers = {c["name"]: c for c in pod_containers(workload)}
    rendezvous, collector = containers.get("rendezvous"), containers.get("collector")
    if rendezvous is None or collector is None:
        release.fail(f"{name}: the rendezvous pod needs a rendezvous and a collector container")
        return
    for container in containers.values():
        if not resources_guaranteed(container):
            release.fail(f"{name}/{container['name']}: requests must equal limits (Guaranteed QoS)")
    sockets = {
        env_of(rendezvous).get("RDV_RENDEZVOUS_DELIVERY_SOCKET"),
        env_of(collector).get("RDV_COLLECTOR_DELIVERY_SOCKET"),
    }
    if len(sockets) != 1 or None in sockets:
        release.fail(f"{name}: the rendezvous and its collector must name one delivery socket")
    socket = next(iter(sockets)) or ""
    shared = None
    for container in (rendezvous, collector):
        mounts = {
            m["name"]: m["mountPath"]
            for m in container.get("volumeMounts", [])
            if socket.startswith(m["mountPath"].rstrip("/") + "/")
        }
        shared = set(mounts.items()) if shared is None else shared & set(mounts.items())
    if not shared:
        release.fail(f"{name}: the delivery socket is not on a volume both containers mount")
    users = {str(c.get("securityContext", {}).get("runAsUser")) for c in (rendezvous, collector)}
    if len(users) != 1:
        release.fail(f"{name}: the rendezvous and its collector must run as one user: {users}")
    for container, variable in ((rendezvous, "RDV_RENDEZVOUS_"), (collector, "RDV_COLLECTOR_")):
        instance: dict[str, Any] = next(
            (e for e in container.get("env", []) if e["name"] == f"{variable}INSTANCE"), {}
        )
        if instance.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
            release.fail(f"{name}/{container['name']}: the instance must be the pod's name")


def check_probes(release: Release, workload: dict[str, Any]) -> None:
    for container in pod_containers(workload):
        where = f"{workload['metadata']['name']}/{container['name']}"
        ports = {p["containerPort"] for p in container.get("ports", [])}
        names = {p.get("name") for p in container.get("ports", [])}
        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(probe_name)
            if probe is None:
                continue
            port = (probe.get("grpc") or probe.get("tcpSocket") or {}).get("port")
            if port is not None and port not in ports and port not in names:
                release.fail(f"{where}: {probe_name} asks port {port}, not one it opens")
            command = probe.get("exec", {}).get("command", [])
            if command:
                address = next((a for a in command if a.startswith("-addr=")), "")
                if address and int(address.rsplit(":", 1)[1]) not in ports:
                    release.fail(f"{where}: {probe_name} asks {address}, not a port it opens")


def runner_hosts(release: Release) -> list[tuple[dict[str, Any], dict[str, str]]]:
    hosts = []
    for workload in release.of_kind("Deployment"):
        for container in pod_containers(workload):
            if python_module(container) == "services.runner":
                hosts.append((workload, env_of(container)))
    return hosts


def check_mesh(release: Release) -> None:
    configmaps = [c for c in release.of_kind("ConfigMap") if MESH_KEY in c.get("data", {})]
    if len(configmaps) != 1:
        release.fail(f"expected one ConfigMap with {MESH_KEY}, found {len(configmaps)}")
        return
    data = configmaps[0]["data"]
    try:
        mesh = Mesh.model_validate(yaml.safe_load(data[MESH_KEY]))
    except ValidationError as error:
        release.fail(f"the mesh file does not load: {error}")
        return
    directory: dict[str, str] = json.loads(data.get(DIRECTORY_KEY, "{}"))
    services = {s["metadata"]["name"]: s for s in release.of_kind("Service")}
    for name, endpoint in directory.items():
        host, _, port = endpoint.rpartition(":")
        service = services.get(host.split(".")[0])
        if service is None or int(port) not in {p["port"] for p in service["spec"]["ports"]}:
            release.fail(f"model directory: {name} -> {endpoint} is no Service port of the release")
    hosts = runner_hosts(release)
    decoys = {
        env_of(c).get("RDV_DECOY_OBJECTIVE")
        for w in release.of_kind("Deployment")
        for c in pod_containers(w)
        if python_module(c) == "services.decoy"
    }
    for objective, entry in mesh.objectives.items():
        groups = {
            int(env.get("RDV_RUNNER_REPLICAS", "1")): env
            for _, env in hosts
            if env.get("RDV_RUNNER_OBJECTIVE") == objective
        }
        for group, env in groups.items():
            if env.get("RDV_RUNNER_SUBSCRIPTION") != group_subscription(group):
                release.fail(
                    f"{objective}: group {group}'s hosts must share {group_subscription(group)}"
                )
        for model in entry.models:
            if not model.enabled:
                continue
            if model.role == "decoy":
                archived = (model.replicas in groups) + (objective in decoys)
                if archived != 1:
                    release.fail(
                        f"{objective}: the decoy (group {model.replicas}) is archived by "
                        f"{archived} writers; exactly one of a runner host of its group or a "
                        "standalone decoy must archive"
                    )
                continue
            if model.replicas not in groups:
                release.fail(
                    f"{objective}: no runner host serves {model.name} (group {model.replicas})"
                )
            if not model.endpoint and model.name not in directory:
                release.fail(f"{objective}: {model.name} has no container and no endpoint")


def check_autoscalers(release: Release) -> None:
    deployments = {d["metadata"]["name"]: d for d in release.of_kind("Deployment")}
    for hpa in release.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            release.fail(f"HPA {hpa['metadata']['name']} scales {target}, which is not deployed")
        elif "replicas" in deployments[target]["spec"]:
            release.fail(f"{target}: an autoscaled Deployment must not set replicas")
    hosts = {w["metadata"]["name"]: env for w, env in runner_hosts(release)}
    for scaled in release.of_kind("ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]["name"]
        env = hosts.get(target)
        if env is None:
            release.fail(
                f"ScaledObject {scaled['metadata']['name']} scales {target}, no runner host"
            )
            continue
        if "replicas" in deployments[target]["spec"]:
            release.fail(f"{target}: a KEDA-scaled Deployment must not set replicas")
        for trigger in scaled["spec"]["triggers"]:
            metadata = trigger["metadata"]
            namespace = env.get("RDV_RUNNER_PULSAR__TENANT_NAMESPACE", "public/default")
            topic = f"persistent://{namespace}/rdv.{env['RDV_RUNNER_OBJECTIVE']}.tasks"
            if metadata.get("topic") != topic:
                release.fail(
                    f"{target}: KEDA watches {metadata.get('topic')}, the hosts read {topic}"
                )
            if metadata.get("subscription") != env.get("RDV_RUNNER_SUBSCRIPTION"):
                release.fail(f"{target}: KEDA watches another subscription than the hosts'")
            if metadata.get("adminURL") != env.get("RDV_RUNNER_PULSAR__ADMIN_URL"):
                release.fail(f"{target}: KEDA asks another admin URL than the hosts use")


def check(release: Release) -> list[str]:
    for workload in release.of_kind("Deployment"):
        if workload["spec"]["template"]["spec"].get("enableServiceLinks", True):
            # Service links would add <SERVICE>_* variables, RDV_<SERVICE>_* among them.
            release.fail(f"{workload['metadata']['name']}: enableServiceLinks must be false")
        for container in pod_containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            check_container_settings(release, where, container)
        check_probes(release, workload)
        if any(python_module(c) == "services.rendezvous" for c in pod_containers(workload)):
            check_answer_path(release, workload)
    if not any(
        python_module(c) == "services.rendezvous"
        for w in release.of_kind("Deployment")
        for c in pod_containers(w)
    ):
        release.fail("no rendezvous Deployment")
    check_mesh(release)
    check_autoscalers(release)
    return release.problems


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print("usage: python -m tools.chart_check RENDERED.yaml [...]", file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        release = load(path)
        problems = check(release)
        for problem in problems:
            print(f"chart-check: {path}: {problem}", file=sys.stderr)
        failed += bool(problems)
        if not problems:
            print(f"chart-check: {path}: {len(release.objects)} objects fit the code base")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
