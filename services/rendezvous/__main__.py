"""`python -m services.rendezvous`: run one rendezvous instance."""

from services.rendezvous.app import main

main()
