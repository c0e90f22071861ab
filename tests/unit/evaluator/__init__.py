"""Unit tests of the evaluator's statistics and outcome/feedback join."""
