"""`python -m services.runner`: run a runner host (its model runners and, when set, the decoy)."""

from .app import main

main()
