"""The published numbers of Trappen et al., Table 1: the "vLLM Node" and "Web Gateway" columns.

Copied from the paper (arXiv 2511.21413, Table 1; ``shared/reference/trappen-table1.csv``):
Mistral Small 3.2 24B on GPU-S (2x L40S) and GPU-L (1x H100), ``vllm bench serve`` on
BurstGPT (seed 0), 100/500/1000 concurrent streaming requests, each value the mean of 50 runs
(hence fractional token totals). Keys are the metric names of ``bench.stats``; ``duration`` is
the benchmark duration in seconds. ``direct`` is the paper's "vLLM Node" column (what the
simulator's profiles are calibrated to), ``gateway`` its "Web Gateway" (one database lookup per
request), the gateway ours is compared with.
"""

from __future__ import annotations

from typing import Literal

PAPER_SOURCE = ("Trappen et al., arXiv 2511.21413, Table 1 ('vLLM Node' = paper direct, 'Web Gateway' = "
                "paper gateway); means of 50 runs on real GPUs with BurstGPT")

Column = Literal["direct", "gateway"]

PAPER: dict[str, dict[str, dict[int, dict[str, float]]]] = {
    "direct": {
        "gpu-s": {  # 2x L40S
            100: {
                "median_ttft_ms": 404.38,
                "median_tpot_ms": 65.52,
                "median_e2el_ms": 2307.96,
                "duration": 30.01,
                "request_throughput": 3.33,
                "output_throughput": 234.91,
                "total_token_throughput": 2820.34,
                "total_input_tokens": 77561,
                "total_output_tokens": 7048.98,
                "std_ttft_ms": 37.59,
                "std_tpot_ms": 6.36,
                "std_e2el_ms": 5215.32,
            },
            500: {
                "median_ttft_ms": 1849.79,
                "median_tpot_ms": 90.61,
                "median_e2el_ms": 7381.58,
                "duration": 48.02,
                "request_throughput": 10.54,
                "output_throughput": 1048.13,
                "total_token_throughput": 9088.7,
                "total_input_tokens": 381456,
                "total_output_tokens": 49763.68,
                "std_ttft_ms": 1477.46,
                "std_tpot_ms": 13.07,
                "std_e2el_ms": 9316.33,
            },
            1000: {
                "median_ttft_ms": 8328.36,
                "median_tpot_ms": 102.13,
                "median_e2el_ms": 22385.04,
                "duration": 84.76,
                "request_throughput": 11.83,
                "output_throughput": 1672.62,
                "total_token_throughput": 10768.98,
                "total_input_tokens": 768960,
                "total_output_tokens": 141407.84,
                "std_ttft_ms": 12460.81,
                "std_tpot_ms": 18,
                "std_e2el_ms": 20958.25,
            },
        },
        "gpu-l": {  # 1x H100
            100: {
                "median_ttft_ms": 225.58,
                "median_tpot_ms": 33.41,
                "median_e2el_ms": 1195.8,
                "duration": 17.2,
                "request_throughput": 5.82,
                "output_throughput": 405.79,
                "total_token_throughput": 4916.07,
                "total_input_tokens": 77561,
                "total_output_tokens": 6978.78,
                "std_ttft_ms": 14.34,
                "std_tpot_ms": 2.34,
                "std_e2el_ms": 2940.16,
            },
            500: {
                "median_ttft_ms": 993.91,
                "median_tpot_ms": 67.21,
                "median_e2el_ms": 3029.86,
                "duration": 25.94,
                "request_throughput": 19.52,
                "output_throughput": 1956.22,
                "total_token_throughput": 16849.58,
                "total_input_tokens": 381456,
                "total_output_tokens": 50126.12,
                "std_ttft_ms": 87.98,
                "std_tpot_ms": 12.19,
                "std_e2el_ms": 4984.3,
            },
            1000: {
                "median_ttft_ms": 2190.97,
                "median_tpot_ms": 86.74,
                "median_e2el_ms": 6190.1,
                "duration": 34.81,
                "request_throughput": 28.87,
                "output_throughput": 4121.7,
                "total_token_throughput": 26322.19,
                "total_input_tokens": 768960,
                "total_output_tokens": 142778.08,
                "std_ttft_ms": 189.22,
                "std_tpot_ms": 29.23,
                "std_e2el_ms": 8206.37,
            },
        },
    },
    "gateway": {
        "gpu-s": {  # 2x L40S
            100: {
                "median_ttft_ms": 334.79,
                "median_tpot_ms": 63.33,
                "median_e2el_ms": 2186.39,
                "duration": 30.03,
                "request_throughput": 3.33,
                "output_throughput": 232.51,
                "total_token_throughput": 2818.61,
                "total_input_tokens": 77561,
                "total_output_tokens": 6976.34,
                "std_ttft_ms": 146.29,
                "std_tpot_ms": 5.52,
                "std_e2el_ms": 5151.45,
            },
            500: {
                "median_ttft_ms": 2412.93,
                "median_tpot_ms": 79.2,
                "median_e2el_ms": 6331.33,
                "duration": 46.95,
                "request_throughput": 10.77,
                "output_throughput": 1066.95,
                "total_token_throughput": 9282.65,
                "total_input_tokens": 381456,
                "total_output_tokens": 49567.64,
                "std_ttft_ms": 1950.86,
                "std_tpot_ms": 6.92,
                "std_e2el_ms": 9148.52,
            },
            1000: {
                "median_ttft_ms": 6825.14,
                "median_tpot_ms": 94.97,
                "median_e2el_ms": 22963.34,
                "duration": 79.75,
                "request_throughput": 12.56,
                "output_throughput": 1775.28,
                "total_token_throughput": 11435.67,
                "total_input_tokens": 768960,
                "total_output_tokens": 141313.34,
                "std_ttft_ms": 13191.81,
                "std_tpot_ms": 10.5,
                "std_e2el_ms": 19999.29,
            },
        },
        "gpu-l": {  # 1x H100
            100: {
                "median_ttft_ms": 207.35,
                "median_tpot_ms": 32.49,
                "median_e2el_ms": 1149.93,
                "duration": 17.31,
                "request_throughput": 5.79,
                "output_throughput": 406.3,
                "total_token_throughput": 4893.63,
                "total_input_tokens": 77561,
                "total_output_tokens": 7027.58,
                "std_ttft_ms": 62.97,
                "std_tpot_ms": 2.08,
                "std_e2el_ms": 2981.23,
            },
            500: {
                "median_ttft_ms": 1133.02,
                "median_tpot_ms": 42.2,
                "median_e2el_ms": 3076.11,
                "duration": 26.28,
                "request_throughput": 19.31,
                "output_throughput": 1928.61,
                "total_token_throughput": 16664.2,
                "total_input_tokens": 381456,
                "total_output_tokens": 49955.58,
                "std_ttft_ms": 841.35,
                "std_tpot_ms": 3.16,
                "std_e2el_ms": 4994.5,
            },
            1000: {
                "median_ttft_ms": 3109.98,
                "median_tpot_ms": 49.05,
                "median_e2el_ms": 9419.23,
                "duration": 37.25,
                "request_throughput": 26.95,
                "output_throughput": 3844.97,
                "total_token_throughput": 24569.65,
                "total_input_tokens": 768960,
                "total_output_tokens": 142664.64,
                "std_ttft_ms": 3642.25,
                "std_tpot_ms": 5.58,
                "std_e2el_ms": 8465.61,
            },
        },
    },
}


def paper_value(profile: str, concurrency: int, key: str, column: Column = "direct") -> float | None:
    """The paper's value, or None where the paper has no such cell (other profiles, levels)."""
    return PAPER[column].get(profile, {}).get(concurrency, {}).get(key)


def paper_levels(profile: str) -> list[int]:
    return sorted(PAPER["direct"].get(profile, {}))
