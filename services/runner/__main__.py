"""`python -m services.runner`: run one model runner."""

from .app import main

main()
