"""The collector sidecar: delivers a rendezvous instance's predictions to its mailboxes."""
