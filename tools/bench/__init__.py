"""The side-by-side benchmark (`make bench`, `python -m tools.bench`).

Five systems on the same models, called open loop at rising rates: S0 a direct
`ModelService/Predict` to the incumbent's container (the floor), S1 the rendezvous with one
model, S2 the rendezvous with three models racing plus a canary and a decoy
(`deploy/mesh/bench-systems.yaml`), S3 the original design re-implemented
(`tools.bench.original`), S4 Ray Serve running S2's race (`tools.bench.rayserve`, no broker).
The systems are interleaved rep by rep; each run records latency quantiles, achieved rate,
errors, the share answered by default and CPU milliseconds per request summed over every
process involved, the broker included. The report adds S2/S0, S3/S2 and S4/S2 per rate.
Results go to `docs/results/bench/latest.{json,md,png}`.
"""
