"""A real MLServer (Open Inference Protocol v2) serving the diabetes ridge model, on loopback.

MLServer pins its own versions of fastapi, grpcio, protobuf and more, so it lives in its own
virtualenv, `.venv-mlserver` (`make mlserver`, part of `make setup`), and only ever runs as a
separate process: nothing of it is imported here. `serve_mlserver` writes a model directory
(tools/oip_diabetes_model.py, run by MLServer's own Python so that the same scikit-learn
pickles and loads the model), starts `mlserver start` on free loopback ports (gRPC, HTTP,
metrics; no inference worker pool: one process, which is what we measure), waits until
`ModelReady` says true, and stops it when the block ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from inference.v2 import grpc_predict_v2_pb2 as oip
from inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc

from services.supervisor.plan import free_port

REPO = Path(__file__).resolve().parents[1]
MLSERVER_VENV = REPO / ".venv-mlserver"
MLSERVER = MLSERVER_VENV / "bin" / "mlserver"
MLSERVER_PYTHON = MLSERVER_VENV / "bin" / "python"
MODEL_SCRIPT = REPO / "tools" / "oip_diabetes_model.py"
MODEL_NAME = "diabetes-ridge"
INPUT = "input-0"
OUTPUT = "predict"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


@dataclass
class MLServer:
    """A started MLServer: where it answers, its process, its model's expected answers."""

    root: Path
    grpc_endpoint: str
    process: subprocess.Popen[bytes]
    log_file: Path
    # Seconds from the process start to ModelReady true.
    ready_s: float = 0.0

    def expected(self) -> dict[str, Any]:
        """features (column order), rows (held-out) and the model's predictions for them."""
        data: dict[str, Any] = json.loads((self.root / "expected.json").read_text())
        return data

    def oip_args(self, **overrides: Any) -> dict[str, Any]:
        """The args of an oip deployment of this model (every feature, FP64)."""
        return {
            "model_name": MODEL_NAME,
            "inputs": self.expected()["features"],
            "output": OUTPUT,
            **overrides,
        }


def prepare(root: Path) -> None:
    """Write the model directory and MLServer's settings (free loopback ports) into `root`."""
    if not MLSERVER.exists():
        raise RuntimeError(f"{MLSERVER} is missing: run 'make mlserver' (part of 'make setup')")
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(MLSERVER_PYTHON), str(MODEL_SCRIPT), str(root), "--model-name", MODEL_NAME],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    settings = {
        "host": "127.0.0.1",
        "grpc_port": free_port(),
        "http_port": free_port(),
        "metrics_port": free_port(),
        # No pool of inference worker processes: the server is the one process measured.
        "parallel_workers": 0,
        "load_models_at_startup": True,
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2))


def model_ready(endpoint: str, timeout_s: float = 1.0) -> bool:
    """Whether the server at `endpoint` says the model is ready (False when it does not answer)."""
    try:
        with grpc.insecure_channel(endpoint) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            reply = stub.ModelReady(oip.ModelReadyRequest(name=MODEL_NAME), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return bool(reply.ready)


@contextmanager
def serve_mlserver(root: Path, *, prepared: bool = False) -> Iterator[MLServer]:
    """MLServer serving the diabetes ridge model from `root` until the block ends; yields
    once ModelReady is true (`ready_s`: how long that took from the process start)."""
    if not prepared:
        prepare(root)
    port = json.loads((root / "settings.json").read_text())["grpc_port"]
    log_file = root / "mlserver.log"
    with log_file.open("ab") as output:
        started = time.monotonic()
        process = subprocess.Popen(
            [str(MLSERVER), "start", str(root)],
            cwd=root,
            env={**os.environ, "PYTHONPATH": ""},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    server = MLServer(root, f"127.0.0.1:{port}", process, log_file)
    try:
        while not model_ready(server.grpc_endpoint, 0.5):
            if process.poll() is not None:
                raise RuntimeError(f"MLServer exited ({process.returncode}); see {log_file}")
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise RuntimeError(f"MLServer not ready in {READY_TIMEOUT_S:g}s; see {log_file}")
            time.sleep(0.05)
        server.ready_s = time.monotonic() - started
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
