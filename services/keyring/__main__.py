"""`python -m services.keyring` runs the keyring."""

from .app import main

main()
