"""Unit tests: one package per component, no broker, no external processes."""
