"""The data plane: a lean OpenAI-compatible streaming gateway (``hpcgate gateway``).

It never imports ``control``; what it shares with the control plane lives in the bottom layer
(``hpcgate.schemas``, the wire contract: msgspec and the standard library only).
"""
