"""Unit tests of the benchmark harness (tools/bench)."""
