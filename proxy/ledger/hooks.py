"""What runs inside every batch's transaction, beside the rows: one list for the proxy's ledger writer and for
copy-ledger, so a copied row lands exactly as a proxied one does.

The rollups move with their rows (`rollups.apply`); on PostgreSQL the shared budgets' spend and reservations
settle with them too (`budget_store.settle_rows`).
"""

from __future__ import annotations

from proxy.ledger import budget_store, rollups
from proxy.ledger.db import AfterInsert
from proxy.ledger.sqlconn import Conn
from proxy.ledger.target import Target

__all__ = ["after_insert_hooks"]


def after_insert_hooks(ledger: Target | Conn) -> list[AfterInsert]:
    """The hooks for a batch written to `ledger` (where it is, or a connection to it)."""
    hooks: list[AfterInsert] = [rollups.apply]
    if ledger.is_postgres:
        hooks.append(budget_store.settle_rows)
    return hooks
