"""Unit tests of the rendezvous service: the policy race and the mailbox over real sockets."""
