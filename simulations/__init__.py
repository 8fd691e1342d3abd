"""Compositions of client, server and common: simulations, benchmarks' building blocks and the CLI."""
