"""Unit tests of the example model containers."""
