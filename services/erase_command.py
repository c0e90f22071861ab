"""`rendezvous erase`: forget a subject (the right to be forgotten).

    rendezvous erase --subject ID [--objective O] [--reason TEXT] [--keyring HOST:PORT]

Calls `KeyringService.Erase` on the running mesh's keyring (or `--keyring`): the subject's
keys are deleted, so every archived task and outcome sealed under them becomes unreadable
wherever a copy of the topic lives; the erasure is published on the erasure topic, and every
enricher drops the subject's state (and never rebuilds it from earlier events), every
evaluator the records it had opened. Without `--objective`, every objective. Erasing a
subject that has no key is not an error. The token (`--token`, `$RDV_TOKEN`) needs the scope
`privacy:erase` when auth is on. The output names the subject's pseudonym only.

Exit status: 0 erased, 1 the keyring could not do it (try again: it is safe), 2 refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from services.core import client

# The keyring's address when no mesh state names one (SupervisorSettings.keyring_listen).
DEFAULT_KEYRING = "127.0.0.1:50054"
# Statuses a retry may cure.
_RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def cmd_erase(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format
    from rendezvous.v1 import keyring_pb2, keyring_pb2_grpc

    from services.core.channels import mesh_client_tls
    from services.evaluator.replay import mesh_state

    state_dir = Path(args.state_dir)
    endpoint = args.keyring or mesh_state(state_dir).get("keyring_endpoint") or DEFAULT_KEYRING
    request = keyring_pb2.EraseRequest(
        subject_id=args.subject, objective=args.objective or "", reason=args.reason or ""
    )
    with client.channel(endpoint, mesh_client_tls(state_dir)) as channel:
        stub = keyring_pb2_grpc.KeyringServiceStub(channel)
        try:
            response = stub.Erase(request, timeout=args.timeout)
        except grpc.RpcError as error:
            code = error.code().name
            details = error.details()
            print(f"rendezvous erase: {code}: {details}", file=sys.stderr)
            return 1 if code in _RETRYABLE else 2
    figures: dict[str, Any] = json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    figures["objective"] = args.objective or "*"
    print(json.dumps(figures, indent=2))
    return 0


def add_parser(sub: Any) -> None:
    """Register `erase` on the `rendezvous` command's subparsers."""
    parser = sub.add_parser(
        "erase",
        help="forget a subject: its keys deleted, its records unreadable, its state dropped",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--subject", required=True, help="the subject id as clients send it")
    parser.add_argument("--objective", help="only this objective (default: every one)")
    parser.add_argument("--reason", help="for the audit trail (a ticket number; no personal data)")
    parser.add_argument("--keyring", help="HOST:PORT (default: the running mesh's)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds")
    client.add_token_option(parser)
    parser.set_defaults(handler=cmd_erase)
