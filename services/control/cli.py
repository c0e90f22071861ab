"""`rendezvous objective`: read and change objective configurations through the control plane.

    rendezvous objective [--target HOST:PORT] [--objective NAME] COMMAND
      show [--version N]          the configuration, as the mesh file writes it
      list                        every objective and its version
      history                     every version: who, when, what, why
      diff [V1 [V2]]              what changed (default: the last change)
      apply FILE                  a mesh file (its --objective entry) or one objective entry
      promote MODEL               MODEL becomes the incumbent, the incumbent a challenger
      split MODEL SHARE           MODEL alone answers SHARE of the first step's requests
      rollback [VERSION]          publish VERSION (default: the one before) again
      add-model NAME [...]        a new deployment (its runner starts); not yet accepted
      remove-model NAME           drop a deployment and every mention in the policy

Every change needs `--reason`; the author is $RDV_AUTHOR, else $USER@host. A change reads
the current version, edits it here (services/control/edits.py), and sends it with that
version as `expected_version`, so a concurrent change makes it fail instead of being lost.
It prints the resulting version and a diff; an error prints the status and each field or
precondition violation, and exits non-zero. `--dry-run` validates without publishing.

The default target is the control endpoint of the running mesh (`rendezvous up`), else
127.0.0.1:50052.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.core import client

DEFAULT_TARGET = "127.0.0.1:50052"
AUTHOR_ENV = "RDV_AUTHOR"
# Exit status for a command line the tool refuses before asking the control plane.
USAGE_ERROR = 2


def author() -> str:
    """Who makes a change: $RDV_AUTHOR, else the user at this host."""
    explicit = os.environ.get(AUTHOR_ENV, "").strip()
    if explicit:
        return explicit
    user = os.environ.get("USER") or getpass.getuser()
    return f"{user}@{socket.gethostname()}"


def control_target(args: argparse.Namespace) -> str:
    """--target, else the running mesh's control endpoint, else the default address."""
    if args.target:
        return str(args.target)
    try:
        state: dict[str, Any] = json.loads((Path(args.state_dir) / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return DEFAULT_TARGET
    if state.get("control_endpoint"):
        return str(state["control_endpoint"])
    for process in state.get("processes", []):
        if process.get("name") == "control" and process.get("endpoint"):
            return str(process["endpoint"])
    return DEFAULT_TARGET


class CommandError(Exception):
    """A refusal of the tool itself, printed as is (exit status 2)."""


# ---------------------------------------------------------------------------- printing


def _when(config: Any) -> str:
    if not config.change.HasField("change_time"):
        return "-"
    stamp: str = config.change.change_time.ToJsonString()
    # Second precision reads better in a table; the topic keeps the full time.
    return stamp[:19] + "Z" if len(stamp) > 20 else stamp


def _header(config: Any) -> str:
    change = config.change
    return (
        f"# objective {config.objective}, version {config.version} "
        f"(previous {change.previous_version})\n"
        f"# {change.action or 'change'} by {change.author or '-'} at {_when(config)}: "
        f"{change.reason or '-'}\n"
    )


def print_rpc_error(err: Any) -> None:
    """The status, then one line per field or precondition violation."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    print(f"{err.code().name}: {err.details()}", file=sys.stderr)
    status = rpc_status.from_call(err)
    if status is None:
        return
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        failure = error_details_pb2.PreconditionFailure()
        if detail.Is(bad_request.DESCRIPTOR):
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        elif detail.Is(failure.DESCRIPTOR):
            detail.Unpack(failure)
            for item in failure.violations:
                print(f"  {item.subject}: {item.description}", file=sys.stderr)


# ---------------------------------------------------------------------------- commands


class Session:
    """One command's connection to the control plane."""

    def __init__(self, args: argparse.Namespace) -> None:
        from rendezvous.v1 import control_pb2_grpc

        self.args = args
        self.objective: str = args.objective
        from services.core.channels import mesh_client_tls

        self.channel = client.channel(control_target(args), mesh_client_tls(Path(args.state_dir)))
        self.stub = control_pb2_grpc.ControlPlaneServiceStub(self.channel)
        self.timeout: float = args.timeout

    def get(self, version: int = 0) -> Any:
        from rendezvous.v1 import control_pb2

        request = control_pb2.GetObjectiveConfigRequest(objective=self.objective, version=version)
        return self.stub.GetObjectiveConfig(request, timeout=self.timeout).config

    def get_or_none(self) -> Any:
        import grpc

        try:
            return self.get()
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def history(self) -> list[Any]:
        from rendezvous.v1 import control_pb2

        request = control_pb2.ListObjectiveHistoryRequest(objective=self.objective)
        return list(self.stub.ListObjectiveHistory(request, timeout=self.timeout).versions)

    def update(self, current: Any, new: Any, action: str) -> int:
        """Send `new` as the next version after `current`; print the version and the diff."""
        from rendezvous.v1 import control_pb2, objective_pb2

        from services.control.edits import diff, same_serving

        if current is not None and same_serving(current, new):
            print(f"{self.objective}: nothing changes at version {current.version}; not published")
            return 0
        new.objective = self.objective
        new.change.CopyFrom(
            objective_pb2.ConfigChange(author=author(), reason=self.args.reason, action=action)
        )
        request = control_pb2.UpdateObjectiveConfigRequest(
            config=new,
            expected_version=current.version if current is not None else 0,
            validate_only=self.args.dry_run,
        )
        stored = self.stub.UpdateObjectiveConfig(request, timeout=self.timeout).config
        before = current.version if current is not None else 0
        note = " (dry run: valid, nothing published)" if self.args.dry_run else ""
        print(f"{self.objective}: version {before} -> {stored.version} [{action}]{note}")
        print(diff(current, stored), end="")
        return 0

    def close(self) -> None:
        self.channel.close()


def cmd_show(session: Session) -> int:
    from services.control.edits import render

    config = session.get(session.args.version)
    print(_header(config) + render(config), end="")
    return 0


def cmd_list(session: Session) -> int:
    from rendezvous.v1 import control_pb2

    request = control_pb2.ListObjectiveConfigsRequest()
    configs = session.stub.ListObjectiveConfigs(request, timeout=session.timeout).configs
    for config in configs:
        print(f"{config.objective:24} v{config.version:<5} {_when(config)}  {config.change.reason}")
    return 0


def cmd_history(session: Session) -> int:
    versions = session.history()
    print(f"{'version':>7}  {'time':20} {'author':24} {'action':10} reason")
    for config in versions:
        change = config.change
        print(
            f"{config.version:>7}  {_when(config):20} {change.author:24} "
            f"{change.action or '-':10} {change.reason}"
        )
    return 0


def cmd_diff(session: Session) -> int:
    from services.control.edits import diff

    versions = {config.version: config for config in session.history()}
    current = max(versions)
    first: int | None = session.args.v1
    second: int = session.args.v2 if session.args.v2 is not None else current
    if first is None:
        first = versions[current].change.previous_version or current - 1
    for version in (first, second):
        if version not in versions:
            raise CommandError(f"{session.objective} has no version {version}")
    out = diff(versions[first], versions[second])
    print(out or f"versions {first} and {second} serve alike", end="" if out else "\n")
    return 0


def _load_entry(path: Path, objective: str) -> Any:
    import yaml
    from pydantic import ValidationError

    from services.core.mesh import Mesh, ObjectiveEntry

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CommandError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CommandError(f"{path} holds no mapping: a mesh file or one objective entry")
    try:
        if "objectives" in data:
            objectives = Mesh.model_validate(data).objectives
            if objective not in objectives:
                raise CommandError(f"{path} has no objective {objective!r}")
            return objectives[objective]
        return ObjectiveEntry.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        ]
        raise CommandError(f"{path} is not a valid objective:\n" + "\n".join(lines)) from exc


def _change(action: str, edit: Callable[[Any], Any]) -> Callable[[Session], int]:
    def command(session: Session) -> int:
        current = session.get_or_none() if action == "apply" else session.get()
        return session.update(current, edit(current), action)

    return command


def cmd_apply(session: Session) -> int:
    from services.core.mesh import to_config

    entry = _load_entry(session.args.file, session.objective)
    return _change("apply", lambda _current: to_config(session.objective, entry))(session)


def cmd_promote(session: Session) -> int:
    from services.control.edits import promote

    return _change("promote", lambda current: promote(current, session.args.model))(session)


def cmd_split(session: Session) -> int:
    from services.control.edits import split

    share: float = session.args.share
    return _change("split", lambda current: split(current, session.args.model, share))(session)


def cmd_rollback(session: Session) -> int:
    from services.control.edits import rollback

    history = session.history()
    target = rollback(history, session.args.version)
    return session.update(history[-1], target, "rollback")


def cmd_add_model(session: Session) -> int:
    from services.control.edits import add_model

    args = session.args
    try:
        model_args = json.loads(args.args) if args.args else {}
    except json.JSONDecodeError as exc:
        raise CommandError(f"--args is not JSON: {exc}") from exc
    if not isinstance(model_args, dict):
        raise CommandError("--args must be a JSON object")

    def edit(current: Any) -> Any:
        return add_model(
            current,
            args.name,
            role=args.role,
            kind=args.kind or "",
            args=model_args,
            version=args.model_version,
            endpoint=args.endpoint or "",
            replicas=args.replicas,
            accept_in=args.accept_in or (),
        )

    return _change("add-model", edit)(session)


def cmd_remove_model(session: Session) -> int:
    from services.control.edits import remove_model

    return _change("remove-model", lambda current: remove_model(current, session.args.name))(
        session
    )


def run(args: argparse.Namespace) -> int:
    import grpc

    from services.control.edits import EditError

    command: Callable[[Session], int] = args.objective_handler
    if getattr(args, "changes", False) and not (args.reason or "").strip():
        print(
            'error: a change needs --reason "why": it is kept with the version in the history',
            file=sys.stderr,
        )
        return USAGE_ERROR
    session = Session(args)
    try:
        return command(session)
    except grpc.RpcError as err:
        print_rpc_error(err)
        return 1
    except (CommandError, EditError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    finally:
        session.close()


def add_parser(sub: Any) -> None:
    """Register `objective` on the `rendezvous` command's subparsers."""
    parser = sub.add_parser(
        "objective",
        help="show, change, promote, split or roll back an objective's configuration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", help="the control plane (default: the running mesh's)")
    parser.add_argument("--objective", default="demo")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds per call")
    client.add_token_option(parser)
    parser.set_defaults(handler=run)
    commands = parser.add_subparsers(dest="objective_command", required=True)

    change = argparse.ArgumentParser(add_help=False)
    change.add_argument("--reason", help="why (required; kept in the history)")
    change.add_argument("--dry-run", action="store_true", help="validate, publish nothing")
    change.set_defaults(changes=True)

    show = commands.add_parser("show", help="the configuration as a mesh entry (YAML)")
    show.add_argument("--version", type=int, default=0, help="a past version (default: current)")
    show.set_defaults(objective_handler=cmd_show)
    commands.add_parser("list", help="every objective").set_defaults(objective_handler=cmd_list)
    commands.add_parser("history", help="every version").set_defaults(objective_handler=cmd_history)
    diff = commands.add_parser("diff", help="what changed between two versions")
    diff.add_argument("v1", type=int, nargs="?", help="default: the version before the current")
    diff.add_argument("v2", type=int, nargs="?", help="default: the current version")
    diff.set_defaults(objective_handler=cmd_diff)

    apply = commands.add_parser("apply", parents=[change], help="publish a mesh-format file")
    apply.add_argument("file", type=Path)
    apply.set_defaults(objective_handler=cmd_apply)
    promote = commands.add_parser("promote", parents=[change], help="make MODEL the incumbent")
    promote.add_argument("model")
    promote.set_defaults(objective_handler=cmd_promote)
    split = commands.add_parser("split", parents=[change], help="give MODEL a share (A/B)")
    split.add_argument("model")
    split.add_argument("share", type=float, help="in [0, 1]; 0 ends the split")
    split.set_defaults(objective_handler=cmd_split)
    rollback = commands.add_parser("rollback", parents=[change], help="publish an old version")
    rollback.add_argument("version", type=int, nargs="?", help="default: the one before")
    rollback.set_defaults(objective_handler=cmd_rollback)
    add = commands.add_parser("add-model", parents=[change], help="add a deployment")
    add.add_argument("name")
    add.add_argument("--role", default="challenger", choices=["challenger", "canary", "decoy"])
    add.add_argument("--kind", help="the example container to run (sum, diabetes, flaky, ...)")
    add.add_argument("--args", help="the container's arguments, a JSON object")
    add.add_argument("--model-version", default="1")
    add.add_argument("--endpoint", help="where an external container listens")
    add.add_argument("--replicas", type=int, default=1)
    add.add_argument(
        "--accept-in", type=int, action="append", help="a policy step (index) to accept it in"
    )
    add.set_defaults(objective_handler=cmd_add_model)
    remove = commands.add_parser("remove-model", parents=[change], help="drop a deployment")
    remove.add_argument("name")
    remove.set_defaults(objective_handler=cmd_remove_model)
