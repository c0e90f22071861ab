"""`python -m services.collector`: run the collector sidecar of one rendezvous instance."""

from services.collector.app import main

main()
