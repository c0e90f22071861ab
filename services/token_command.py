"""`rendezvous token`: mint a bearer token for local use; `rendezvous up --auth`'s key.

    rendezvous token --subject S --scope score:demo --scope control:read [--ttl 1h]

The key is the mesh's (`rendezvous up --auth` writes an HS256 secret under the state
directory, `.run/mesh/auth/hs256.secret`), or `--secret-file`, or `--private-key-file`
(RS256 / ES256, PEM). The token goes to stdout alone, so that
`export RDV_TOKEN=$(rendezvous token ...)` makes every client command send it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

# The services whose calls come from outside the mesh; `up --auth` turns auth on for these.
AUTHENTICATED_SERVICES = ("RENDEZVOUS", "CONTROL", "EVALUATOR", "KEYRING")
# The scope of the mesh's own keyring calls (sealing and opening records).
MESH_KEYRING_SCOPE = "privacy:keys"
_TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def mesh_secret(state_dir: Path) -> Path:
    return state_dir / "auth" / "hs256.secret"


def mesh_keyring_token(state_dir: Path) -> Path:
    return state_dir / "auth" / "keyring.token"


def mesh_auth_env(state_dir: Path) -> dict[str, str]:
    """Turn auth on for the mesh's client-facing services (and the keyring) with a fresh
    HS256 secret (kept across `up`s while the file exists), and mint the token the mesh's
    own processes present to the keyring; the environment the supervisor passes on."""
    from services.core.auth import mint_token, write_secret
    from services.core.settings import AuthSettings

    secret = mesh_secret(state_dir.resolve())
    defaults = AuthSettings()
    if not secret.exists():
        write_secret(secret, defaults.min_secret_bytes)
    env: dict[str, str] = {}
    for service in AUTHENTICATED_SERVICES:
        env[f"RDV_{service}_AUTH__ENABLED"] = "true"
        env[f"RDV_{service}_AUTH__SECRET_FILE"] = str(secret)
    token_file = mesh_keyring_token(state_dir.resolve())
    token = mint_token(
        AuthSettings(secret_file=secret),
        "rendezvous-mesh",
        [MESH_KEYRING_SCOPE],
        defaults.mesh_token_ttl_s,
    )
    token_file.touch(mode=0o600, exist_ok=True)
    token_file.chmod(0o600)
    token_file.write_text(token)
    env["RDV_SUPERVISOR_KEYRING_TOKEN_FILE"] = str(token_file)
    return env


def parse_ttl(text: str) -> float:
    """`90`, `90s`, `15m`, `1h`, `2d` as seconds."""
    match = _TTL.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 1h)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def cmd_token(args: argparse.Namespace) -> int:
    from services.core.auth import mint_token
    from services.core.settings import AuthSettings

    secret_file = args.secret_file
    if secret_file is None and args.private_key_file is None:
        secret_file = mesh_secret(args.state_dir)
        if not secret_file.exists():
            print(
                f"no key: {secret_file} does not exist (start the mesh with `rendezvous up "
                "--auth`, or give --secret-file or --private-key-file)",
                file=sys.stderr,
            )
            return 2
    settings = AuthSettings(
        secret_file=secret_file,
        private_key_file=args.private_key_file,
        issuer=args.issuer or AuthSettings().issuer,
        audience=args.audience or AuthSettings().audience,
    )
    print(mint_token(settings, args.subject, args.scope, args.ttl))
    return 0


def add_parser(sub: Any) -> None:
    """Register `token` on the `rendezvous` command's subparsers."""
    parser = sub.add_parser(
        "token",
        help="mint a bearer token (local use) from the mesh's key or a given one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--subject", required=True, help="who the token speaks for")
    parser.add_argument(
        "--scope",
        action="append",
        default=[],
        help="a scope to grant (repeatable): score:OBJ|*, control:read, control:write[:OBJ], "
        "evaluate:OBJ, feedback:OBJ, privacy:erase, privacy:keys",
    )
    parser.add_argument("--ttl", type=parse_ttl, default=parse_ttl("1h"), help="e.g. 15m, 1h")
    parser.add_argument("--secret-file", type=Path, help="HS256 secret (default: the mesh's)")
    parser.add_argument("--private-key-file", type=Path, help="RS256 / ES256 private key, PEM")
    parser.add_argument("--issuer", help="the iss claim (default: the services' default)")
    parser.add_argument("--audience", help="the aud claim (default: the services' default)")
    parser.set_defaults(handler=cmd_token)
