"""Unit tests of the model data enricher."""
