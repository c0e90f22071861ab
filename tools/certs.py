"""Loopback certificates for a TLS mesh: a CA, a server certificate, a client certificate.

    .venv/bin/python -m tools.certs [--out .run/certs] [--days 30] [--force]

The CA signs a server certificate valid for 127.0.0.1, ::1 and localhost (every local
process's server presents it) and a client certificate (what each process and command-line
tool presents to an mTLS server). Keys are ECDSA P-256, written owner-only. File names are
`services.supervisor.certs`'s, where `rendezvous up --tls` looks. Existing files are kept
unless `--force`. For local meshes and tests only: a deployment brings its own PKI.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.supervisor import certs as names

LOOPBACK_NAMES: tuple[x509.GeneralName, ...] = (
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Rendezvous (local)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(subject: str, issuer: x509.Name, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .serial_number(x509.random_serial_number())
        # An hour back: a clock a little behind still accepts a fresh certificate.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(common_name: str, days: int) -> Issued:
    """A self-signed CA that may sign leaf certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), days)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued, common_name: str, days: int, *, server: bool, names_: tuple[x509.GeneralName, ...]
) -> Issued:
    """A leaf certificate signed by `ca`: for a server (with `names_` as its SANs) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca.cert.subject, days)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if names_:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names_)), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)


def _save(issued: Issued, cert_path: Path, key_path: Path) -> None:
    _write(cert_path, issued.cert.public_bytes(serialization.Encoding.PEM), private=False)
    key = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key, private=True)


def write_loopback_certs(out: Path, days: int) -> None:
    """A fresh CA, server and client certificate (and keys) in `out`."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = make_ca("Rendezvous local CA", days)
    server = issue(ca, "rendezvous-server", days, server=True, names_=LOOPBACK_NAMES)
    client = issue(ca, "rendezvous-client", days, server=False, names_=())
    _save(ca, out / names.CA_CERT, out / names.CA_KEY)
    _save(server, out / names.SERVER_CERT, out / names.SERVER_KEY)
    _save(client, out / names.CLIENT_CERT, out / names.CLIENT_KEY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=names.DEFAULT_CERTS_DIR)
    parser.add_argument("--days", type=int, default=30, help="validity of every certificate")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    if not args.force and all((args.out / name).exists() for name in names.ALL_FILES):
        print(f"certificates already in {args.out} (--force replaces them)")
        return 0
    write_loopback_certs(args.out, args.days)
    print(f"CA, server (127.0.0.1, ::1, localhost) and client certificates written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
