"""Process-level deployment: the platform's and the merchants' Flower processes.

``platform`` runs ``fedshop server`` (a loopback SuperLink, ``proxy``: nginx passing only the
Fleet API, ``run_log``: what the operator sees of a run); ``merchant`` runs ``fedshop client``
(a SuperNode that runs no app code and ``runner``, which answers only apps the merchant pinned,
``pinning``); ``flower`` builds the exact Flower commands and drives the ``flwr`` CLI;
``process`` supervises child processes.
"""
