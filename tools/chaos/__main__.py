"""`python -m tools.chaos`: run the fault matrix and write docs/results/reliability.md."""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from tools.bench.environment import ensure_broker
from tools.chaos.run import ALL_FAULTS, REPO, markdown, matrix, write

DEFAULT_OUT = REPO / "docs" / "results" / "reliability.md"
# Ports of the matrix's broker when it starts one (a running broker of this checkout is used),
# unless PULSAR_BROKER_PORT / PULSAR_WEB_PORT say others (as for tools/pulsar.sh).
BROKER_PORT = int(os.environ.get("PULSAR_BROKER_PORT", "6681"))
WEB_PORT = int(os.environ.get("PULSAR_WEB_PORT", "8091"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="each fault's phase")
    parser.add_argument("--lead", type=float, default=10.0, help="steady load before a fault")
    parser.add_argument("--faults", default=",".join(ALL_FAULTS), help="comma-separated")
    parser.add_argument("--soak", type=float, default=600.0, help="seconds (0: none)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(ALL_FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {', '.join(ALL_FAULTS)}")
    broker = ensure_broker(BROKER_PORT, WEB_PORT)
    try:
        with tempfile.TemporaryDirectory(prefix="chaos-") as work:
            result = asyncio.run(
                matrix(broker, Path(work), faults, args.rate, args.seconds, args.lead, args.soak)
            )
    finally:
        broker.stop()
    print(markdown(result))
    write(result, args.out)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
