"""Unit tests of the supervisor's plan."""
