"""The `rendezvous` command: bring a mesh up and down, look at it, score through it.

rendezvous up [--mesh FILE] [--pulsar-url URL] [--tls] [--auth]   broker + every component
              [--traces]                          ... and Jaeger, every process tracing to it
              [--pulsar-auth] [--pulsar-token-file F]  ... with token authentication
              [--pulsar-tls] [--pulsar-tls-trust-certs-file F]  ... with the broker on TLS
              [--rendezvous-replicas N]         ... N rendezvous, clients round-robin over them
rendezvous status [--metrics]                     what runs, where, and whether it is healthy
rendezvous score [--features JSON]                one request, the answer as JSON
rendezvous demo [--requests N] [--rate R]         traffic, its ground truth, the evaluation
rendezvous demo-promote [--rate R]                add, promote, roll back a challenger under load
rendezvous down                                   stop the mesh and the broker `up` started
rendezvous run COMPONENT                          run one component in the foreground
rendezvous objective show|history|diff|apply|promote|split|rollback   the control plane
rendezvous report [--objective O] [--since T]      evaluation: terminal summary + HTML page
rendezvous replay --model NAME --kind K            archived traffic through a model not live
rendezvous token --subject S --scope SCOPE         mint a bearer token (mesh with auth on)
rendezvous erase --subject ID [--objective O]      forget a subject (crypto-shredding)
rendezvous trace REQUEST_ID                        one request's trace as a waterfall (--traces)

Client commands send `--token`, else $RDV_TOKEN, as `authorization: Bearer` (auth on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from services import erase_command, token_command, trace_command
from services.control import cli as objective_commands
from services.core import client
from services.core.channels import (
    REPLICA_SERVICE_CONFIG,
    STATE_TLS_KEY,
    replicated_target,
    state_client_tls,
    target_addresses,
)
from services.core.settings import REPO_ROOT, PulsarSettings
from services.evaluator import replay as replay_command
from services.evaluator import report_command
from services.supervisor.certs import DEFAULT_CERTS_DIR

REPO = REPO_ROOT
DEFAULT_MESH = REPO / "deploy" / "mesh" / "demo.yaml"
DEFAULT_STATE = REPO / ".run" / "mesh"
PULSAR_SCRIPT = REPO / "tools" / "pulsar.sh"
COMPONENTS = (
    "control",
    "keyring",
    "rendezvous",
    "collector",
    "enricher",
    "runner",
    "models",
    "decoy",
)


def _state(state_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((state_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pulsar_env(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        [str(PULSAR_SCRIPT), "env"], check=True, capture_output=True, text=True, env=env
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


# The supervisor's settings (SupervisorSettings.pulsar) it passes on to every process.
SUPERVISOR_TOKEN_FILE_ENV = "RDV_SUPERVISOR_PULSAR__TOKEN_FILE"
SUPERVISOR_TLS_TRUST_ENV = "RDV_SUPERVISOR_PULSAR__TLS_TRUST_CERTS_FILE"


# ---------------------------------------------------------------------------- up / down / status


def start_broker(args: argparse.Namespace) -> None:
    """`tools/pulsar.sh up`, with token authentication (--pulsar-auth) and TLS only
    (--pulsar-tls: no plaintext port left open) when asked; then `args` name its URLs, token
    file and CA as `pulsar.sh env` prints them."""
    broker_env = {
        **os.environ,
        "PULSAR_AUTH": "token" if args.pulsar_auth else "none",
        "PULSAR_TLS": "only" if args.pulsar_tls else "none",
    }
    subprocess.run([str(PULSAR_SCRIPT), "up"], check=True, env=broker_env)
    env = _pulsar_env(broker_env)
    args.pulsar_url = env["PULSAR_SERVICE_URL"]
    args.pulsar_admin_url = env["PULSAR_ADMIN_URL"]
    if "PULSAR_TOKEN_FILE" in env:
        args.pulsar_token_file = Path(env["PULSAR_TOKEN_FILE"])
    if "PULSAR_TLS_TRUST_CERTS_FILE" in env:
        args.pulsar_tls_trust_certs_file = Path(env["PULSAR_TLS_TRUST_CERTS_FILE"])


def supervisor_env(args: argparse.Namespace) -> dict[str, str]:
    """The supervisor's environment: the mesh's bearer-token key (--auth), and the broker's
    token file and CA, which it passes on to every process (PulsarSettings.security_env)."""
    env = {
        **os.environ,
        **(token_command.mesh_auth_env(args.state_dir) if args.auth else {}),
    }
    if args.pulsar_token_file is not None:
        env[SUPERVISOR_TOKEN_FILE_ENV] = str(args.pulsar_token_file.resolve())
    if args.pulsar_tls_trust_certs_file is not None:
        env[SUPERVISOR_TLS_TRUST_ENV] = str(args.pulsar_tls_trust_certs_file.resolve())
    return env


def cmd_up(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    current = _state(state_dir)
    if current and _alive(current.get("supervisor_pid")) and current.get("phase") == "ready":
        print(f"The mesh is already up: {current['endpoint']}")
        return 0
    broker_started = args.pulsar_url is None
    if broker_started:
        start_broker(args)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "state.json").unlink(missing_ok=True)
    log_file = state_dir / "supervisor.log"
    command = [
        sys.executable,
        "-m",
        "services.cli",
        "--state-dir",
        str(state_dir.resolve()),
        "supervise",
        "--mesh",
        str(args.mesh.resolve()),
        "--pulsar-url",
        args.pulsar_url,
        "--pulsar-admin-url",
        args.pulsar_admin_url,
    ]
    if broker_started:
        command.append("--owns-broker")
    if args.tls:
        command += ["--tls", "--certs-dir", str(args.certs_dir.resolve())]
    if args.traces:
        command.append("--traces")
    if args.rendezvous_replicas is not None:
        command += ["--rendezvous-replicas", str(args.rendezvous_replicas)]
    with log_file.open("ab") as log:
        # A session of its own: the mesh outlives this command, `rendezvous down` ends it.
        supervisor = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=REPO,
            env=supervisor_env(args),
        )
    started = time.monotonic()
    while time.monotonic() - started < args.timeout:
        state = _state(state_dir)
        if state and state.get("phase") in ("ready", "failed", "stopped"):
            break
        if supervisor.poll() is not None:
            state = _state(state_dir)
            break
        time.sleep(0.5)
    else:
        state = _state(state_dir)
    if not state or state.get("phase") != "ready":
        print(f"The mesh did not come up; see {log_file} and {state_dir / 'logs'}", file=sys.stderr)
        _print_processes(state)
        return 1
    took = time.monotonic() - started
    print(f"Rendezvous is up in {took:.1f}s: {len(state['processes'])} processes.")
    _print_processes(state)
    endpoint = state["endpoint"]
    print(
        f"\nControlPlaneService at {state.get('control_endpoint', '-')}: objective versions "
        f"{_versions(state)}"
    )
    if state.get("evaluator_endpoint"):
        print(
            f"EvaluationService and FeedbackService at {state['evaluator_endpoint']}; "
            f"live dashboard at {state.get('dashboard_url') or '-'}"
        )
    if state.get("keyring_endpoint"):
        print(
            f"KeyringService at {state['keyring_endpoint']}: "
            "`rendezvous erase --subject ID` forgets a subject"
        )
    body = json.dumps({"objective": "demo", "features": _sample_features()})
    tls = state_client_tls(state)
    transport = (
        f"-cacert {tls.ca_file} -cert {tls.client_cert_file} -key {tls.client_key_file}"
        if tls.client_enabled
        else "-plaintext"
    )
    replicas = target_addresses(endpoint)
    print(
        f"\nScoringService at {endpoint} (gRPC{', mTLS' if tls.client_enabled else ''}, "
        f"reflection on). Try:\n"
        f"  tools/bin/grpcurl {transport} -d '{body}' \\\n"
        f"    {replicas[0]} rendezvous.v1.ScoringService/Score\n"
        f"  .venv/bin/rendezvous score\n  make demo\n"
        f"  .venv/bin/rendezvous report --objective demo\n  make down"
    )
    traces = state.get(trace_command.STATE_TRACES_KEY)
    if traces:
        print(
            f"\nTraces go to Jaeger (OTLP {traces['otlp_endpoint']}); its query API at "
            f"{traces['query_url']}/api/traces. One request's waterfall:\n"
            "  .venv/bin/rendezvous trace REQUEST_ID   (the request_id `rendezvous score` prints)"
        )
    if len(replicas) > 1:
        print(
            f"\n{len(replicas)} rendezvous replicas ({', '.join(replicas)}), each with its own "
            "collector and return address. Python and other C-core clients pass the target "
            "above as it is, with the round-robin service config in `rendezvous status --json` "
            "(client_service_config); grpcurl and ghz (grpc-go) dial one replica "
            "(docs/deploy.md#scale-out-on-one-machine)."
        )
    if args.auth:
        print(
            f"\nAuth is on (key: {token_command.mesh_secret(state_dir)}). Get a token first:\n"
            "  export RDV_TOKEN=$(.venv/bin/rendezvous token --subject $USER "
            "--scope 'score:*' --scope control:read --scope evaluate:demo --scope feedback:demo "
            "--scope privacy:erase --scope privacy:keys)"
        )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state = _state(args.state_dir)
    pid = state.get("supervisor_pid") if state else None
    if pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        print("The mesh is stopped.")
    else:
        print("No mesh is running.")
    if state and state.get("owns_broker"):
        subprocess.run([str(PULSAR_SCRIPT), "down"], check=False)
    return 0


def _print_processes(state: dict[str, Any] | None) -> None:
    if not state:
        return
    print(f"{'process':28} {'role':12} {'endpoint':22} {'pid':>7} {'restarts':>8}  status")
    for process in state["processes"]:
        print(
            f"{process['name']:28} {process['role'] or process.get('instance') or '-':12} "
            f"{process['endpoint']:22} "
            f"{process['pid'] or '-':>7} {process['restarts']:>8}  {process['status']}"
        )
    for process in state["processes"]:
        warmup = process.get("warmup")
        if warmup:
            print(
                f"warm-up of {process['name']}: {warmup['state']}, {warmup['sent']} requests "
                f"in {warmup['seconds']:.1f}s, {warmup['in_time']} in time, "
                f"{warmup['consecutive']} in a row"
            )


def _print_metrics(state: dict[str, Any], state_dir: Path) -> None:
    """Every process's Prometheus endpoint, and the broker's (what
    `prometheus-targets.json` in the state dir lists for a Prometheus to scrape)."""
    from services.supervisor.app import PROMETHEUS_TARGETS, prometheus_targets

    print(f"{'process':28} metrics")
    for group in prometheus_targets(state["processes"], state.get("pulsar_admin_url")):
        labels = group["labels"]
        scheme, path = labels.get("__scheme__", "http"), labels.get("__metrics_path__", "/metrics")
        print(f"{labels['component']:28} {scheme}://{group['targets'][0]}{path}")
    print(f"\nPrometheus file_sd targets: {state_dir / PROMETHEUS_TARGETS}")


def _versions(state: dict[str, Any]) -> str:
    versions: dict[str, int] = state.get("objective_versions") or {}
    return ", ".join(f"{name} v{version}" for name, version in sorted(versions.items())) or "-"


def cmd_status(args: argparse.Namespace) -> int:
    from services.supervisor.app import check_health

    state = _state(args.state_dir)
    if not state or not _alive(state.get("supervisor_pid")):
        print("No mesh is running.")
        return 1

    async def probe() -> list[bool]:
        tls = state_client_tls(state)
        return list(
            await asyncio.gather(
                *(check_health(p["endpoint"], tls=tls) for p in state["processes"])
            )
        )

    healthy = asyncio.run(probe())
    for process, ok in zip(state["processes"], healthy, strict=True):
        if ok:
            # A removed model's container serves on while the runner hosts drain it.
            draining = process["status"] == "draining"
            process["status"] = "SERVING (draining, stops soon)" if draining else "SERVING"
        else:
            process["status"] = f"NOT SERVING ({process['status']})"
    if args.json:
        print(json.dumps(state, indent=2))
    elif args.metrics:
        _print_metrics(state, args.state_dir)
    else:
        print(
            f"phase: {state['phase']}  endpoint: {state['endpoint']}  "
            f"rendezvous replicas: {len(target_addresses(state['endpoint']))}  "
            f"control: {state.get('control_endpoint', '-')}  "
            f"evaluator: {state.get('evaluator_endpoint') or '-'}  "
            f"keyring: {state.get('keyring_endpoint') or '-'}  "
            f"dashboard: {state.get('dashboard_url') or '-'}  broker: {state['pulsar_url']}"
        )
        print(f"objective versions: {_versions(state)}")
        _print_processes(state)
    return 0 if all(healthy) else 1


def cmd_supervise(args: argparse.Namespace) -> int:
    from services.core.mesh import load_mesh
    from services.core.privacy import write_key_file
    from services.core.telemetry import configure_logging
    from services.supervisor.app import Supervisor, SupervisorSettings
    from services.supervisor.certs import client_only, ensure_certs, mesh_tls
    from services.supervisor.live import LiveMesh
    from services.supervisor.plan import (
        EvaluatorAddress,
        Ports,
        PrivacyFiles,
        plan_control,
        plan_jaeger,
        plan_keyring,
        privacy_env,
        reserve_ports,
    )

    configure_logging("supervisor")
    # Read here only to fail early on a bad file; the control component seeds the topic
    # from it and everything else is planned from the topic.
    mesh = load_mesh(args.mesh)
    settings = SupervisorSettings()
    if args.traces:
        settings.traces = True
    try:
        listens = mesh.rendezvous.replica_listens(args.rendezvous_replicas)
    except ValueError as error:
        print(f"cannot run the rendezvous replicas: {error}", file=sys.stderr)
        return 2
    # Replicas start stage by stage: ports handed out meanwhile must not take theirs.
    reserve_ports(
        [
            *listens,
            settings.control_listen,
            settings.keyring_listen,
            settings.evaluator_listen,
            settings.dashboard_listen,
        ]
    )
    ports = Ports()
    tls = None
    if args.tls:
        ensure_certs(args.certs_dir)
        tls = mesh_tls(args.certs_dir)
    control = plan_control(
        args.mesh,
        args.state_dir,
        args.pulsar_url,
        args.pulsar_admin_url,
        settings.control_listen,
        ports,
        pulsar_env=settings.pulsar.security_env(),
        tls=tls,
    )
    first = [control]
    keyring = None
    privacy = None
    if settings.keyring_listen:
        # Made once and kept with the state dir: they open every record sealed so far.
        files = PrivacyFiles.under(args.state_dir)
        write_key_file(files.pseudonym_key)
        write_key_file(files.master_key)
        keyring = plan_keyring(
            files,
            args.state_dir,
            args.pulsar_url,
            args.pulsar_admin_url,
            settings.keyring_listen,
            ports,
            pulsar_env=settings.pulsar.security_env(),
            tls=tls,
        )
        first.append(keyring)
        privacy = privacy_env(keyring.endpoint, files, settings.keyring_token_file)
    evaluator = (
        EvaluatorAddress(settings.evaluator_listen, settings.dashboard_listen)
        if settings.evaluator_listen
        else None
    )
    live = LiveMesh(
        args.pulsar_url,
        args.pulsar_admin_url,
        args.state_dir,
        listens,
        ports,
        objectives=mesh.objectives,
        evaluator=evaluator,
        pulsar=settings.pulsar,
        tls=tls,
        privacy=privacy,
    )
    traces = settings.trace_store()
    if traces is not None:
        try:
            first.insert(0, plan_jaeger(args.state_dir, traces, ports))
        except FileNotFoundError as missing:
            print(f"Cannot run traces: {missing}", file=sys.stderr)
            return 2
    supervisor = Supervisor(
        first,
        args.state_dir / "state.json",
        facts={
            # What clients dial: one address, or the round-robin target of every replica.
            "endpoint": replicated_target(listens),
            **({"client_service_config": REPLICA_SERVICE_CONFIG} if len(listens) > 1 else {}),
            "control_endpoint": control.endpoint,
            "keyring_endpoint": keyring.endpoint if keyring else None,
            "evaluator_endpoint": evaluator.listen if evaluator else None,
            "dashboard_url": (
                f"http://{evaluator.dashboard_listen}/"
                if evaluator and evaluator.dashboard_listen
                else None
            ),
            "mesh": str(args.mesh),
            # The broker, and where its token and CA are (never the token): for the
            # commands that read the topics (PulsarSettings.for_mesh).
            **live.pulsar.state_facts(),
            "owns_broker": args.owns_broker,
            # What the command-line tools need to call a TLS mesh (services.core.channels).
            STATE_TLS_KEY: client_only(tls).model_dump(mode="json") if tls else None,
            # Where `rendezvous trace` asks for a request's trace.
            trace_command.STATE_TRACES_KEY: traces.facts() if traces else None,
        },
        settings=settings,
        live=live,
    )
    return asyncio.run(supervisor.run())


def cmd_run(args: argparse.Namespace) -> int:
    sys.argv = [f"services.{args.component}"]
    runpy.run_module(f"services.{args.component}", run_name="__main__", alter_sys=True)
    return 0


# ---------------------------------------------------------------------------- score / demo


def _sample_features() -> dict[str, float]:
    """The diabetes dataset's first row (scaled), as the demo objective expects."""
    return {
        "age": 0.0380759,
        "sex": 0.0506801,
        "bmi": 0.0616962,
        "bp": 0.0218724,
        "s1": -0.0442235,
        "s2": -0.0348208,
        "s3": -0.0434008,
        "s4": -0.0025923,
        "s5": 0.0199075,
        "s6": -0.0176461,
    }


def _target(args: argparse.Namespace) -> str:
    if args.target:
        return str(args.target)
    state = _state(args.state_dir)
    return str(state["endpoint"]) if state else "127.0.0.1:50051"


def cmd_score(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format
    from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc

    from services.core.channels import mesh_client_tls
    from services.core.protos import set_values

    request = scoring_pb2.ScoreRequest(objective=args.objective, subject_id=args.subject or "")
    set_values(request.features, json.loads(args.features) if args.features else _sample_features())
    with client.channel(_target(args), mesh_client_tls(args.state_dir)) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        try:
            response = stub.Score(request, timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"{err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(json_format.MessageToJson(response, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    state = _state(args.state_dir)
    return asyncio.run(
        run_demo(
            target=_target(args),
            objective=args.objective,
            requests=args.requests,
            rate=args.rate,
            evaluator=(state or {}).get("evaluator_endpoint") or "127.0.0.1:50053",
            tls=state_client_tls(state or {}),
        )
    )


def cmd_demo_promote(args: argparse.Namespace) -> int:
    from services.demo_promote import print_report, run_drill, write_report

    state = _state(args.state_dir) or {}
    print(
        f"Traffic at {args.rate:g}/s to {_target(args)}; after {args.hold:g}s a challenger "
        f"({args.challenger}) is added, promoted, then rolled back, {args.hold:g}s apart ..."
    )
    report = asyncio.run(
        run_drill(
            target=_target(args),
            control_target=objective_commands.control_target(
                argparse.Namespace(target=args.control_target, state_dir=args.state_dir)
            ),
            objective=args.objective,
            pulsar=PulsarSettings().for_mesh(state),
            rate=args.rate,
            hold_s=args.hold,
            challenger=args.challenger,
            tls=state_client_tls(state),
        )
    )
    print_report(report)
    if args.out:
        write_report(report, args.out)
        print(f"\nwritten to {args.out}")
    failed = report.failed_calls or report.inconsistent or report.missing_outcomes
    return 1 if failed or report.missing_archive else 0


def _replicas(text: str) -> int:
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return count


def _replicas_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rendezvous-replicas",
        type=_replicas,
        metavar="N",
        help="rendezvous instances, each with its own collector and return address, on ports "
        "rendezvous.port_step apart (default: the mesh file's rendezvous.replicas, 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rendezvous", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the broker (unless given) and every component")
    up.add_argument("--mesh", type=Path, default=DEFAULT_MESH)
    up.add_argument("--pulsar-url", help="use this broker instead of starting one")
    up.add_argument("--pulsar-admin-url", default="http://127.0.0.1:8080")
    up.add_argument(
        "--pulsar-auth",
        action="store_true",
        help="start the broker with token authentication (tools/pulsar.sh, PULSAR_AUTH=token)",
    )
    up.add_argument(
        "--pulsar-token-file",
        type=Path,
        help="the token of a given broker (--pulsar-url) with authentication on",
    )
    up.add_argument(
        "--pulsar-tls",
        action="store_true",
        help="start the broker on TLS only (tools/pulsar.sh, PULSAR_TLS=only): pulsar+ssl:// "
        "and https:// with a local CA every component trusts; combines with --pulsar-auth",
    )
    up.add_argument(
        "--pulsar-tls-trust-certs-file",
        type=Path,
        help="the CA of a given broker (--pulsar-url pulsar+ssl://...) on TLS",
    )
    up.add_argument("--timeout", type=float, default=360.0)
    up.add_argument(
        "--tls",
        action="store_true",
        help="mTLS on every gRPC server and client (certificates made in --certs-dir if missing)",
    )
    up.add_argument("--certs-dir", type=Path, default=DEFAULT_CERTS_DIR)
    up.add_argument(
        "--auth", action="store_true", help="bearer-token auth on, with a key under the state dir"
    )
    up.add_argument(
        "--traces",
        action="store_true",
        help="run Jaeger on loopback and send every process's spans to it (rendezvous trace)",
    )
    _replicas_option(up)
    up.set_defaults(handler=cmd_up)

    down = sub.add_parser("down", help="stop the mesh, and the broker if `up` started it")
    down.add_argument("--timeout", type=float, default=60.0)
    down.set_defaults(handler=cmd_down)

    status = sub.add_parser("status", help="show every process and its health")
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--metrics", action="store_true", help="list every process's Prometheus /metrics URL"
    )
    status.set_defaults(handler=cmd_status)

    score = sub.add_parser("score", help="send one request and print the answer")
    score.add_argument("--target")
    score.add_argument("--objective", default="demo")
    score.add_argument("--features", help="JSON object of features (default: a diabetes row)")
    score.add_argument("--subject")
    score.add_argument("--timeout", type=float, default=5.0)
    client.add_token_option(score)
    score.set_defaults(handler=cmd_score)

    demo = sub.add_parser("demo", help="drive traffic and report per model")
    demo.add_argument("--target")
    demo.add_argument("--objective", default="demo")
    demo.add_argument("--requests", type=int, default=300)
    demo.add_argument("--rate", type=float, default=50.0, help="requests per second")
    client.add_token_option(demo)
    demo.set_defaults(handler=cmd_demo)

    drill = sub.add_parser(
        "demo-promote", help="add, promote and roll back a challenger under live traffic"
    )
    drill.add_argument("--target")
    drill.add_argument("--control-target", help="ControlPlaneService (default: the mesh's)")
    drill.add_argument("--objective", default="demo")
    drill.add_argument("--rate", type=float, default=100.0, help="requests per second")
    drill.add_argument("--hold", type=float, default=8.0, help="seconds between changes")
    drill.add_argument("--challenger", default="diabetes-ridge-v2")
    drill.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    client.add_token_option(drill)
    drill.set_defaults(handler=cmd_demo_promote)

    run = sub.add_parser("run", help="run one component in the foreground")
    run.add_argument("component", choices=COMPONENTS)
    run.set_defaults(handler=cmd_run)

    objective_commands.add_parser(sub)
    replay_command.add_parser(sub)
    report_command.add_parser(sub)
    token_command.add_parser(sub)
    erase_command.add_parser(sub)
    trace_command.add_parser(sub)

    supervise = sub.add_parser("supervise", help=argparse.SUPPRESS)
    supervise.add_argument("--mesh", type=Path, required=True)
    supervise.add_argument("--pulsar-url", required=True)
    supervise.add_argument("--pulsar-admin-url", required=True)
    supervise.add_argument("--owns-broker", action="store_true")
    supervise.add_argument("--tls", action="store_true")
    supervise.add_argument("--certs-dir", type=Path, default=DEFAULT_CERTS_DIR)
    supervise.add_argument("--traces", action="store_true")
    _replicas_option(supervise)
    supervise.set_defaults(handler=cmd_supervise)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Behave like a Unix tool when piped into `head`.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    client.use_token_option(args)
    handler: Any = args.handler
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
