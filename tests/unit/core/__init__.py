"""Unit tests of the common core."""
