"""The rendezvous' delivery socket is the collector's alone: 0600 in a 0700 directory, so
another local user can neither reach it (the directory) nor connect to it (the socket).

The other user is real: `rdv-intruder`, a system account made here when missing (the tests
run as root, here and in CI). Not root: skipped. Root but the account cannot be made:
skipped, except under CI=true, where that fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.server import GrpcServer, private_socket_dir

INTRUDER = "rdv-intruder"
# The intruder's client: a bare connect, by a Python that is not the project's venv (the
# intruder may not read the checkout); prints the errno name, or OK.
_CONNECT = """
import errno, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
else:
    print("OK")
"""


def _system_python() -> str:
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no system python3 for the intruder's client")


@pytest.fixture(scope="module")
def intruder() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    with contextlib.suppress(KeyError):
        pwd.getpwnam(INTRUDER)
        return INTRUDER
    made = subprocess.run(
        ["useradd", "--system", "--no-create-home", INTRUDER],
        check=False,
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        message = f"cannot create {INTRUDER}: {made.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return INTRUDER


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may traverse (as /tmp is), so only the socket's own
    directory and the socket itself stand between the intruder and the socket."""
    path = Path(tempfile.mkdtemp(prefix="rdv-socket-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def served(base: Path) -> AsyncIterator[Path]:
    """A server on `base/rendezvous/delivery.sock`, whose directory was left world-readable
    (an older run, another umask): the server must tighten it."""
    directory = base / "rendezvous"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    path = directory / "delivery.sock"
    server = GrpcServer(service_names=[], registrars=[], tcp_address=None, uds_path=path)
    await server.start()
    await server.set_serving(True)
    try:
        yield path
    finally:
        await server.stop(0)


def _connect_as(user: str, path: Path) -> str:
    done = subprocess.run(
        [_system_python(), "-c", _CONNECT, str(path)],
        user=user,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_socket_is_0600_in_a_0700_directory(served: Path) -> None:
    assert _mode(served.parent) == 0o700
    status = os.stat(served)
    assert stat.S_ISSOCK(status.st_mode)
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert status.st_uid == os.geteuid()


async def test_owner_connects_and_another_user_is_refused(served: Path, intruder: str) -> None:
    async with grpc.aio.insecure_channel(f"unix://{served}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    assert _connect_as(intruder, served) == errno.errorcode[errno.EACCES]

    # Defence in depth: with the directory opened up, the socket's own mode still refuses.
    os.chmod(served.parent, 0o755)
    assert _connect_as(intruder, served) == errno.errorcode[errno.EACCES]
    # And the check is real: a socket open to all lets the intruder in.
    os.chmod(served, 0o666)
    assert _connect_as(intruder, served) == "OK"


def test_a_directory_of_another_user_is_refused(base: Path, intruder: str) -> None:
    directory = base / "theirs"
    directory.mkdir()
    account = pwd.getpwnam(intruder)
    os.chown(directory, account.pw_uid, account.pw_gid)
    with pytest.raises(PermissionError, match="belongs to uid"):
        private_socket_dir(directory)


def test_a_new_directory_is_made_0700_whatever_the_umask(base: Path) -> None:
    old = os.umask(0)
    try:
        private_socket_dir(base / "a" / "b")
    finally:
        os.umask(old)
    assert _mode(base / "a" / "b") == 0o700


def test_the_owner_connects_with_a_plain_client(served: Path) -> None:
    # The owner's own bare connect (the intruder's client, as the owner) succeeds.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(served))
