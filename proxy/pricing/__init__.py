"""The price table (exact Decimal), its YAML schema, and the live table that reloads it."""
