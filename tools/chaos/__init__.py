"""The fault matrix (`make chaos`): a ledger of every request under faults, and what was lost."""
