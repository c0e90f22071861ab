"""The decoy: subscribes to an objective's tasks like a model, never answers, and archives
every task exactly as the models saw it, PII redacted, for audit and replay (except those the
rendezvous sampled out of the archive: `ScoringTask.skip_archive`)."""
