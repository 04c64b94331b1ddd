"""The SQLite ledger: the batch writer and its spool, migrations, read connections, rollups, upkeep (retention) and re-pricing."""
