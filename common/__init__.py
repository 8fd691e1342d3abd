"""Code shared by the platform, the merchants and the auditors.

Nothing in here imports ``client``, ``server`` or ``simulations``: an auditor or a merchant
can depend on ``common`` alone.
"""
