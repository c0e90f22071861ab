"""Unit tests of the model runner."""
