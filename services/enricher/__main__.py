"""`python -m services.enricher` runs the model data enricher."""

from .app import main

main()
