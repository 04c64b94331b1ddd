"""Admission control: managed keys, budgets, limits, rate limits, alerts, the gate, and the control database."""
