"""Process-level deployment: start, supervise and stop Flower's SuperLink and SuperNodes.

``process`` supervises child processes; ``flower`` builds the exact Flower commands and talks
to a SuperLink through the ``flwr`` CLI, so every step has a documented raw equivalent.
"""
