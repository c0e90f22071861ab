"""`python -m services.control` runs the control plane."""

from .app import main

main()
