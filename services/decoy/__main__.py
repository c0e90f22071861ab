"""`python -m services.decoy` runs the decoy of one objective."""

from .app import main

main()
