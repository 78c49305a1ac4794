"""Step-cost profiles of the simulated GPU: how long one continuous-batching step takes.

A step of the engine runs every scheduled sequence once. Its duration is

    t = base_s + per_seq_s * batch + per_prefill_token_s * prefill_tokens
        + per_context_token_s * context_tokens

where ``batch`` is the number of sequences in the step, ``prefill_tokens`` the prompt tokens
computed in it (chunked prefill, bounded by ``max_num_batched_tokens`` together with one token
per decoding sequence) and ``context_tokens`` the KV-cache tokens the decoding sequences read
(attention cost grows with context). ``kv_cache_tokens`` is the KV-cache capacity; when it is
full, admission stops and the newest running sequence is preempted (recompute), as in vLLM.

The ``gpu-s`` and ``gpu-l`` numbers are calibrated against the paper's Table 1 "vLLM Node"
columns; see docs/simulator.md for the method and the error per cell. ``fast`` is for tests.
"""

from __future__ import annotations

import msgspec


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    base_s: float
    per_seq_s: float
    per_prefill_token_s: float
    per_context_token_s: float
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_tokens: int
    block_size: int = 16

    def step_time(self, batch: int, prefill_tokens: int, context_tokens: int) -> float:
        return (self.base_s + self.per_seq_s * batch + self.per_prefill_token_s * prefill_tokens
                + self.per_context_token_s * context_tokens)


PROFILES: dict[str, Profile] = {
    # Tests and the data-plane overhead benchmark: ~1000 tokens/s per stream, engine never the
    # bottleneck.
    "fast": Profile(
        name="fast", base_s=0.001, per_seq_s=0.0, per_prefill_token_s=0.0, per_context_token_s=0.0,
        max_num_seqs=256, max_num_batched_tokens=65536, kv_cache_tokens=4_000_000,
    ),
    # Proxy benchmarks: a GPU-like token pace (20 ms per step, 50 tokens/s per stream) with no
    # batch or prefill cost, so 1000 streams ask a proxy for a realistic 50k chunks/s.
    "paced": Profile(
        name="paced", base_s=0.020, per_seq_s=0.0, per_prefill_token_s=0.0, per_context_token_s=0.0,
        max_num_seqs=1024, max_num_batched_tokens=1_000_000, kv_cache_tokens=4_000_000,
    ),
    # 2x L40S (TP 2), Mistral Small 3.2 24B bf16. vLLM's defaults for a <70 GiB device:
    # max_num_seqs 256, max_num_batched_tokens 2048.
    "gpu-s": Profile(
        name="gpu-s", base_s=0.032, per_seq_s=0.00012, per_prefill_token_s=0.00012,
        per_context_token_s=9.5e-8, max_num_seqs=256, max_num_batched_tokens=2048,
        kv_cache_tokens=200_000,
    ),
    # 1x H100 80 GB, same model. vLLM's defaults for a >=70 GiB device: max_num_seqs 1024,
    # max_num_batched_tokens 8192.
    "gpu-l": Profile(
        name="gpu-l", base_s=0.016, per_seq_s=0.00008, per_prefill_token_s=0.00008,
        per_context_token_s=5e-8, max_num_seqs=1024, max_num_batched_tokens=8192,
        kv_cache_tokens=120_000,
    ),
}
