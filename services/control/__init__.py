"""The control plane: the one writer of the control topic, its gRPC service (Get, List,
Update, ListObjectiveHistory) with validation and optimistic concurrency, and the
`rendezvous objective` command that composes promotions, splits and rollbacks from them."""
