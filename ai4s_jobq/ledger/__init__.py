"""The outcome ledger: what became of every task (see :mod:`.base`)."""
