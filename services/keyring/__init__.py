"""The keyring: one data key per subject and objective, kept durably, looked up by
pseudonym; erasing a subject deletes its keys (crypto-shredding) and announces the erasure
on the erasure topic."""
