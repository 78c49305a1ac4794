"""The benchmark harness: the vLLM simulator (``hpcgate sim``) and the load driver (``hpcgate bench``).

``bench`` may import ``gateway`` and ``control`` (for their wire schemas), never the reverse.
"""
