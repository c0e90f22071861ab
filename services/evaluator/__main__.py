"""`python -m services.evaluator` runs the evaluator."""

from .app import main

main()
