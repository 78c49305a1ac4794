"""The control plane: registration and admin API, Job Worker, Endpoint Worker, autoscaler.

May import the bottom layer (``hpcgate.schemas``, the wire types shared with the gateway, and
``hpcgate.settings`` / ``logs`` / ``backoff`` / ``metrics_text``); never ``gateway``.
"""
