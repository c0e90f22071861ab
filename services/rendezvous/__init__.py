"""The rendezvous service: answers each Score call within its SLA with the best
prediction the objective's policy accepts, racing predictions in a mailbox."""
