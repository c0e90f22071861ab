"""Channels for the `rendezvous` client commands, carrying the caller's bearer token.

The token is `--token` (every client command takes it) or else `$RDV_TOKEN`; `main` puts
`--token` in the environment, so every channel the command opens (`channel`, `aio_channel`)
sends `authorization: Bearer <token>` on each call. No token: no header (a mesh without
auth). TLS is the channel builder's (`services.core.channels`), as for every other client;
the services' own channels (a runner to its model containers) never send a token.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from services.core.settings import TlsSettings

TOKEN_ENV = "RDV_TOKEN"
Options = Sequence[tuple[str, Any]]


def add_token_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token", help=f"bearer token for a mesh with auth on (default: ${TOKEN_ENV})"
    )


def use_token_option(args: argparse.Namespace) -> None:
    """Make `--token`, when given, the token every channel of this process sends."""
    token = getattr(args, "token", None)
    if token:
        os.environ[TOKEN_ENV] = token


def current_token() -> str | None:
    return os.environ.get(TOKEN_ENV, "").strip() or None


def channel(target: str, tls: TlsSettings | None = None, options: Options = ()) -> grpc.Channel:
    """A blocking channel to `target` (TLS per `tls`) sending the current token, if any."""
    from services.core.bearer import SyncBearer
    from services.core.channels import sync_channel

    token = current_token()
    return sync_channel(target, tls, options, interceptors=[SyncBearer(token)] if token else ())


def aio_channel(
    target: str, tls: TlsSettings | None = None, options: Options = ()
) -> grpc.aio.Channel:
    """An asyncio channel to `target` (TLS per `tls`) sending the current token, if any."""
    from services.core.bearer import AioBearer
    from services.core.channels import aio_channel as open_aio

    token = current_token()
    return open_aio(target, tls, options, interceptors=[AioBearer(token)] if token else ())
