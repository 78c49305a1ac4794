"""The Job Worker (``hpcgate control jobs``) and the job-side registration client.

Layers, lowest first: ``naming``/``resources``/``render`` (pure), ``plan`` (pure decisions),
``store`` (SQL), ``reconcile`` (observe, plan, apply), ``main`` (the daemon).
"""
