"""Stand-ins that tests use in place of real infrastructure (the in-memory bus)."""
