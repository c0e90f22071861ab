"""Where `rendezvous up --tls` keeps its loopback certificates, and the TLS they make.

`tools/certs.py` writes a CA, a server certificate for 127.0.0.1/localhost and a client
certificate into one directory (`.run/certs/` by default) under the names below;
`ensure_certs` runs it when a file is missing. `mesh_tls` is what every process of a TLS
mesh gets: its server on mTLS, its clients trusting the CA and presenting the client cert.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from services.core.settings import REPO_ROOT, TlsSettings

DEFAULT_CERTS_DIR = REPO_ROOT / ".run" / "certs"
# Run from the repository root, like tools/pulsar.sh: tools/ is not an installed package.
CERTS_MODULE = "tools.certs"
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client.pem"
CLIENT_KEY = "client-key.pem"
ALL_FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)


def mesh_tls(certs_dir: Path) -> TlsSettings:
    """mTLS servers and TLS clients with the loopback certificates in `certs_dir`."""
    return TlsSettings(
        cert_file=certs_dir / SERVER_CERT,
        key_file=certs_dir / SERVER_KEY,
        client_ca_file=certs_dir / CA_CERT,
        ca_file=certs_dir / CA_CERT,
        client_cert_file=certs_dir / CLIENT_CERT,
        client_key_file=certs_dir / CLIENT_KEY,
    )


def client_only(tls: TlsSettings) -> TlsSettings:
    """The client side of `tls` (what state.json records for the command-line tools)."""
    return TlsSettings(
        ca_file=tls.ca_file,
        client_cert_file=tls.client_cert_file,
        client_key_file=tls.client_key_file,
    )


def ensure_certs(certs_dir: Path) -> None:
    """Make the loopback certificates with tools/certs.py unless all are there already."""
    if all((certs_dir / name).exists() for name in ALL_FILES):
        return
    subprocess.run(
        [sys.executable, "-m", CERTS_MODULE, "--out", str(certs_dir)], check=True, cwd=REPO_ROOT
    )
