"""Pure parts of the harness: token rule, EOS draw, stats vs numpy, BurstGPT sampling, synthetic."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from bench.driver import RunSettings, arrival_times, build_body
from bench.sim import wire
from bench.sim.textgen import count_tokens, generated_text, make_prompt, output_length, prompt_seed
from bench.stats import RequestRecord, calculate_metrics, summarize
from bench.workload import (
    DEFAULT_OUTPUT,
    LONGEST_OUTPUT,
    SYNTHETIC_INPUT,
    SYNTHETIC_OUTPUT,
    load_burstgpt,
    sample_indices,
    synthetic,
)


def test_prompt_construction_agrees_with_simulator_count() -> None:
    for n in (1, 2, 7, 770, 4000):
        assert count_tokens(make_prompt(n, offset=n)) == n
        body = build_body(RunSettings(base_url="http://x"), make_prompt(n, offset=3), 5)
        assert wire.parse_completion(body)[1] == n
        chat = build_body(RunSettings(base_url="http://x", endpoint="chat"), make_prompt(n), 5)
        assert wire.parse_chat(chat)[1] == n
    assert count_tokens(generated_text(prompt_seed("x"), 9)) == 9


def test_eos_draw_is_deterministic_and_below_max_tokens_on_average() -> None:
    seeds = [prompt_seed(make_prompt(700, offset=i)) for i in range(2000)]
    outs = [output_length(s, 300, ignore_eos=False, eos_mean_tokens=100) for s in seeds]
    assert outs == [output_length(s, 300, ignore_eos=False, eos_mean_tokens=100) for s in seeds]
    assert min(outs) >= 1 and max(outs) <= 300
    assert 70 < float(np.mean(outs)) < 110
    assert output_length(seeds[0], 300, ignore_eos=True, eos_mean_tokens=100) == 300


def test_summarize_matches_numpy_definitions() -> None:
    vals = [0.010, 0.020, 0.035, 0.5, 0.0125]
    arr = np.array(vals) * 1000
    got = summarize(vals, (50, 99))
    assert got["mean"] == pytest.approx(np.mean(arr))
    assert got["median"] == pytest.approx(np.median(arr))
    assert got["std"] == pytest.approx(np.std(arr))  # population std, ddof 0
    assert got["p99"] == pytest.approx(np.percentile(arr, 99))
    assert summarize([], (99,)) == {"mean": 0.0, "median": 0.0, "std": 0.0, "p99": 0.0}


def test_calculate_metrics_like_vllm() -> None:
    recs = [
        RequestRecord(index=0, prompt_len=10, max_tokens=5, success=True, ttft=0.1, latency=0.5,
                      output_tokens=5, itl=[0.1, 0.1, 0.1, 0.1]),
        RequestRecord(index=1, prompt_len=20, max_tokens=1, success=True, ttft=0.2, latency=0.2,
                      output_tokens=1),
        RequestRecord(index=2, prompt_len=30, max_tokens=5, error="HTTP 400"),
    ]
    m = calculate_metrics(recs, duration=2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 30, 6)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["total_token_throughput"] == pytest.approx(18.0)
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # only the request with > 1 token: (0.5-0.1)/4
    assert m["median_ttft_ms"] == pytest.approx(150.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0)


def test_sampling_matches_pandas_claim_from_readme() -> None:
    # pandas DataFrame.sample(n, random_state=0) over the 87,349 GPT-4 rows starts with these positions
    assert sample_indices(87_349, 5, 0) == [78406, 79127, 40822, 55456, 81474]
    assert sample_indices(50, 10, 3) == list(np.random.RandomState(3).permutation(50)[:10])
    assert sample_indices(50, 100, 0)[:3] == sample_indices(50, 100, 0)[:3]  # replace=True beyond the pool
    first = sample_indices(1000, 100, 0)
    assert sample_indices(1000, 500, 0)[:100] == first  # nested prefixes


def test_burstgpt_csv_filters_gpt4_with_positive_response(tmp_path: Path) -> None:
    rows = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    pool = []
    for i in range(40):
        model = "GPT-4" if i % 3 else "ChatGPT"
        resp = 0 if i % 7 == 0 else i + 1
        rows.append(f"{i}.0,{model},{100 + i},{resp},{101 + 2 * i},API log")
        if model == "GPT-4" and resp > 0:
            pool.append((100 + i, resp))
    path = tmp_path / "burst.csv"
    path.write_text("\n".join(rows) + "\n")
    w = load_burstgpt(path, 6, seed=0)
    idx = np.random.RandomState(0).permutation(len(pool))[:6]
    assert w.name == "burstgpt"
    assert w.prompt_lens == [pool[i][0] for i in idx]
    assert w.output_lens == [pool[i][1] for i in idx]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="not a BurstGPT CSV"):
        load_burstgpt(bad, 1)


def test_synthetic_matches_table1_totals_per_profile_and_is_labelled() -> None:
    for profile, totals in (*SYNTHETIC_OUTPUT.items(), (None, DEFAULT_OUTPUT)):
        big = synthetic(1000, 0, profile)
        longest = 0
        blocks = zip(SYNTHETIC_INPUT, totals, LONGEST_OUTPUT, strict=True)
        for (n, total_in), total_out, block_longest in blocks:
            w = synthetic(n, 0, profile)
            longest = max(longest, block_longest)
            assert w.name == "synthetic"
            assert profile is None or f"of {profile}" in w.source
            assert (len(w), sum(w.prompt_lens), sum(w.output_lens)) == (n, total_in, total_out)
            assert max(w.output_lens) == longest  # the longest output of each prefix is as stated
            assert w.output_lens == big.output_lens[:n]  # nested like vLLM's samples
        assert np.median(big.output_lens) < 0.5 * np.mean(big.output_lens)  # long-tailed
    # Both GPUs get the same prompts (the same BurstGPT sample); only output totals differ a little.
    assert synthetic(1000, 0, "gpu-s").prompt_lens == synthetic(1000, 0, "gpu-l").prompt_lens


def test_arrival_times() -> None:
    assert arrival_times(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    t = arrival_times(100, 10.0, 1.0, 0)
    assert t[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(t)) and t[-1] < 10.0


def test_wire_rejects_bad_requests() -> None:
    with pytest.raises(wire.BadRequestError):
        wire.parse_chat(b'{"messages": []}')
    with pytest.raises(wire.BadRequestError):
        wire.parse_completion(b'{"prompt": "x", "max_tokens": 0}')
    with pytest.raises(wire.BadRequestError):
        wire.parse_completion(b"not json")
    assert wire.parse_completion(b'{"prompt": [1, 2, 3]}')[1] == 3
