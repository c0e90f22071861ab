"""Unit tests of the control plane: validation, edits, and the plane on the in-memory bus."""
