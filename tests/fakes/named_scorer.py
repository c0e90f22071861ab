"""A stand-in rendezvous replica for channel tests: `ScoringService.Score` answers with the
replica's name as the request id (after `delay_ms` for a request whose objective is
HOLD); health SERVING unless told otherwise.

`python -m tests.fakes.named_scorer NAME DELAY_MS` serves one on a free loopback port in a
process of its own (so a test can kill it with SIGKILL) and prints the port once it serves.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc

from services.core.server import GrpcServer
from services.core.settings import TlsSettings

SERVICE = "rendezvous.v1.ScoringService"
# The objective of a request answered only after the replica's delay.
HOLD = "hold"


class NamedScorer(scoring_pb2_grpc.ScoringServiceServicer):
    """Says who answered; waits `delay_s` first for a HOLD request (a call in flight to
    kill), answers any other at once."""

    def __init__(self, name: str, delay_s: float = 0.0) -> None:
        self.name = name
        self.delay_s = delay_s
        self.calls = 0

    async def Score(
        self, request: scoring_pb2.ScoreRequest, context: Any
    ) -> scoring_pb2.ScoreResponse:
        self.calls += 1
        if request.objective == HOLD:
            await asyncio.sleep(self.delay_s)
        return scoring_pb2.ScoreResponse(request_id=self.name)


def named_server(scorer: NamedScorer, tls: TlsSettings | None = None) -> GrpcServer:
    """A server on a free loopback port with `scorer` behind it (start it, then set health)."""
    return GrpcServer(
        service_names=[SERVICE],
        registrars=[lambda s: scoring_pb2_grpc.add_ScoringServiceServicer_to_server(scorer, s)],
        tcp_address="127.0.0.1:0",
        tls=tls,
    )


async def _main(name: str, delay_ms: float) -> None:
    server = named_server(NamedScorer(name, delay_ms / 1000))
    await server.start()
    await server.set_serving(True)
    print(server.tcp_port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], float(sys.argv[2])))
