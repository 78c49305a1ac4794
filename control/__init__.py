"""The control plane: registration and admin API, Job Worker, Endpoint Worker, autoscaler.

May import ``gateway.schemas`` (shared wire types) and ``hpcgate.settings`` / ``hpcgate.logs``;
never the rest of ``gateway``.
"""
