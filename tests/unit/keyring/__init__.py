"""Unit tests of the keyring."""
