"""Run the ``fedshop`` CLI with only the deployment commands (fast to import, no torch)."""

from __future__ import annotations

import sys

from simulations import cli

cli.COMMAND_MODULES = ("simulations.commands.certs", "simulations.commands.deploy")

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
