"""hpcgate: the process entry point and the few pieces every component shares.

Layering (lowest first): ``hpcgate.settings`` / ``hpcgate.logs`` -> ``gateway`` ->
``control`` / ``bench`` -> ``hpcgate.cli`` / ``hpcgate.up``. The lower modules import only the
standard library, msgspec and orjson, so every component may use them.
"""

__version__ = "0.1.0"
