"""The side-by-side benchmark (`make bench`, `python -m tools.bench`).

Four systems on the same models and the same broker, called open loop at rising rates:
S0 a direct `ModelService/Predict` to the incumbent's container (the floor), S1 the
rendezvous with one model, S2 the rendezvous with three models racing plus a canary and a
decoy (`deploy/mesh/bench-systems.yaml`), S3 the original design re-implemented
(`tools.bench.original`). The systems are interleaved rep by rep; each run records latency
quantiles, achieved rate, errors, the share answered by default and CPU milliseconds per
request summed over every process involved, the broker included. Results go to
`docs/results/bench/latest.{json,md,png}`.
"""
