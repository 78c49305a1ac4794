"""The benchmark harness: the vLLM simulator (``hpcgate sim``) and the load driver (``hpcgate bench``).

``bench`` may import ``gateway``, ``control`` and ``hpcgate``, never the reverse. The simulator
needs only the base install (compute nodes run it); the load driver, Table 1 and overhead
harnesses need the ``bench`` extra.
"""
