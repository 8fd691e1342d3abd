"""Offline auditor toolkit: verify ledger copies, tabulate budgets, recompute epsilon
independently of Opacus, and render a self-contained report (``fedshop audit``)."""
