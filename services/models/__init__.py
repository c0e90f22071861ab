"""Example model containers: `rendezvous.v1.ModelService` over gRPC, one model per process.

Kinds: `sum` (the original Rendezvous blog's test model), `diabetes` (a linear model
trained offline on scikit-learn's diabetes dataset, served from a JSON artifact) and
`flaky` (configurable latency and errors, for demos and tests).
"""
