"""hpcgate: the process entry point and the few pieces every component shares.

Layering (lowest first): the bottom layer (``hpcgate.settings``, ``hpcgate.logs``,
``hpcgate.backoff``, ``hpcgate.metrics_text`` and the shared wire contract ``hpcgate.schemas``)
-> ``gateway`` | ``control`` (neither imports the other) -> ``bench`` -> ``hpcgate.cli`` /
``hpcgate.up``. The bottom modules import only the standard library, msgspec and orjson, so
every component may use them; ``hpcgate.schemas`` imports only msgspec and the standard library.
"""

__version__ = "0.1.0"
