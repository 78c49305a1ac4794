"""Step-cost profiles of the simulated GPU: how long one continuous-batching step takes.

A step of the engine runs every scheduled sequence once. Its duration is

    t = base_s + per_seq_s * batch + per_prefill_token_s * prefill_tokens
        + per_context_token_s * context_tokens + per_admitted_seq_s * admitted

where ``batch`` is the number of sequences in the step, ``prefill_tokens`` the prompt tokens
computed in it (chunked prefill, bounded by ``max_num_batched_tokens`` together with one token
per decoding sequence), ``context_tokens`` the KV-cache tokens the decoding sequences read
(attention cost grows with context) and ``admitted`` the requests the step takes from the
queue (the per-request cost of starting one: input processing, scheduling, block tables).
A prompt of ``n`` tokens reaches the engine as ``max(1, round(n * prompt_scale))`` tokens: that
is what prefill computes and the KV cache holds. ``kv_cache_tokens`` is the KV-cache capacity;
when it is full, admission stops and the newest running sequence is preempted (recompute).

``gpu-s`` and ``gpu-l`` take the scheduler limits (vLLM 0.10's defaults for their GPU memory),
the KV capacity and the prefill cost from the hardware, and the parameters in
:data:`FIT_PARAMS` from ``bench/sim/calibrated.py``, fitted to the paper's Table 1 "vLLM Node"
cells by ``hpcgate bench calibrate --fit`` (docs/simulator.md, "Calibration"). ``fast`` and
``paced`` are for tests and the proxy benchmarks.
"""

from __future__ import annotations

import msgspec

from bench.sim.calibrated import FITTED

# The parameters the calibration fits; everything else in a profile comes from the hardware.
FIT_PARAMS = ("base_s", "per_seq_s", "per_context_token_s", "prompt_scale", "per_admitted_seq_s")


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
    prompt_scale: float = 1.0
    per_admitted_seq_s: float = 0.0

    def step_time(self, batch: int, prefill_tokens: int, context_tokens: int, admitted: int = 0) -> float:
        return (self.base_s + self.per_seq_s * batch + self.per_prefill_token_s * prefill_tokens
                + self.per_context_token_s * context_tokens + self.per_admitted_seq_s * admitted)

    def engine_prompt_len(self, prompt_len: int) -> int:
        return max(1, round(prompt_len * self.prompt_scale))


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
    # 2x L40S (48 GB each, TP 2), Mistral Small 3.2 24B bf16. vLLM 0.10's OpenAI-server defaults
    # for a device under 70 GiB: max_num_seqs 256, max_num_batched_tokens 2048. Prefill: 48 GFLOP
    # per token at ~2x200 TFLOP/s; KV: ~200k tokens of 160 KiB.
    "gpu-s": Profile(
        name="gpu-s", per_prefill_token_s=0.00012, max_num_seqs=256, max_num_batched_tokens=2048,
        kv_cache_tokens=200_000, **FITTED["gpu-s"],  # type: ignore[arg-type]
    ),
    # 1x H100 80 GB, same model. vLLM 0.10's defaults for a device of 70 GiB or more (and not an
    # A100): max_num_seqs 1024, max_num_batched_tokens 8192. Prefill at ~600 TFLOP/s; KV ~120k tokens.
    "gpu-l": Profile(
        name="gpu-l", per_prefill_token_s=0.00008, max_num_seqs=1024, max_num_batched_tokens=8192,
        kv_cache_tokens=120_000, **FITTED["gpu-l"],  # type: ignore[arg-type]
    ),
}
