"""Contract tests: one suite that every implementation of an interface must pass."""
