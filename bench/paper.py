"""The published numbers of Trappen et al., Table 1 ("vLLM Node" columns), as far as we have them.

Only the token totals are available to this project (from shared/data/burstgpt/README.md,
which quotes the table): total input tokens per prompt count, and the total generated tokens
of the vLLM node averaged over 50 runs. The table's latency and throughput cells (TTFT, TPOT,
E2EL medians, request/token throughput) could NOT be retrieved here (the paper's text is not
in our stores), so they are ``None`` and shown as "n/a": never invented. Fill them in
:data:`PAPER` from arXiv 2511.21413 (Table 1) when a copy is at hand; the table, plots and
calibration errors then pick them up.
"""

from __future__ import annotations

PAPER_SOURCE = ("Trappen et al., arXiv 2511.21413, Table 1, 'vLLM Node' columns. Only token totals are "
                "available to us; latency/throughput cells are n/a (not retrieved, not invented).")

PAPER: dict[str, dict[int, dict[str, float]]] = {
    "gpu-s": {  # 2x L40S
        100: {"total_input_tokens": 77_561, "total_output_tokens": 7_048.98},
        500: {"total_input_tokens": 381_456, "total_output_tokens": 49_763.68},
        1000: {"total_input_tokens": 768_960, "total_output_tokens": 141_407.84},
    },
    "gpu-l": {  # 1x H100
        100: {"total_input_tokens": 77_561, "total_output_tokens": 6_978.78},
        500: {"total_input_tokens": 381_456, "total_output_tokens": 50_126.12},
        1000: {"total_input_tokens": 768_960, "total_output_tokens": 142_778.08},
    },
}


def paper_value(profile: str, concurrency: int, key: str) -> float | None:
    return PAPER.get(profile, {}).get(concurrency, {}).get(key)
