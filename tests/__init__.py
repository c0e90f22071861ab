"""The Rendezvous test suite: unit (no broker), contract (twin and broker alike) and integration."""
