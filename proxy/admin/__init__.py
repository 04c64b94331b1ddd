"""The admin HTTP API (reports, keys, budgets, limits) and the key holder's own usage view."""
