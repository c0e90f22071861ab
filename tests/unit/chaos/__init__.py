"""Unit tests of the fault matrix's ledger."""
