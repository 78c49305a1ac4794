"""A vLLM-compatible engine simulator: vLLM's OpenAI wire format over a modelled GPU.

Layers, lowest first: ``textgen`` (token counting and fake text, pure), ``profiles`` (step
cost models), ``engine`` (continuous batching, pure, driven by an explicit clock), ``wire``
(request views and response framing, pure), ``metrics`` (Prometheus registry per instance),
``http`` (the asyncio/httptools connection protocol), ``app`` (routing and the engine loop),
``main`` (the CLI). Lower layers never import higher ones.
"""

from bench.sim.app import SimConfig, Simulator, run_simulator

__all__ = ["SimConfig", "Simulator", "run_simulator"]
