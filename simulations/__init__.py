"""Compositions of client, server and common: simulations, benchmark building blocks, the CLI."""
