"""Unit tests of the decoy."""
