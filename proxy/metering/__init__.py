"""One metered call: the per-endpoint meters, the SSE decoder, usage extraction, the call's metrics; turns what forwarding saw into a priced, committed ledger row."""
