"""Integration tests: the real Pulsar broker, real servers and real sockets."""
