"""Subcommands of the ``fedshop`` CLI, one module per group."""
