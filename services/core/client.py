"""Channels for the `rendezvous` client commands, carrying the caller's bearer token.

The token is `--token` (every client command takes it) or else `$RDV_TOKEN`; `main` puts
`--token` in the environment, so every channel the command opens (`channel`, `aio_channel`)
sends `authorization: Bearer <token>` on each call. No token: plain channels, as before
(a mesh without auth). Model containers are never sent the token.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

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


def channel(target: str, options: Options = ()) -> grpc.Channel:
    """A blocking channel to `target` sending the current token, if any."""
    import grpc

    from services.core.bearer import SyncBearer

    plain = grpc.insecure_channel(target, options=options)
    token = current_token()
    return grpc.intercept_channel(plain, SyncBearer(token)) if token else plain


def aio_channel(target: str, options: Options = ()) -> grpc.aio.Channel:
    """An asyncio channel to `target` sending the current token, if any."""
    import grpc

    from services.core.bearer import AioBearer

    token = current_token()
    interceptors = [AioBearer(token)] if token else None
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
