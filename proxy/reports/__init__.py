"""Read-only reports over the ledger: usage reports, their plan and SQL, accuracy, rendering, export."""
