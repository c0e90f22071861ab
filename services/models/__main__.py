"""`python -m services.models`: serve one example model."""

from .app import main

main()
