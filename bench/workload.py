"""Benchmark workloads: BurstGPT sampled as vLLM samples it, or a labelled synthetic stand-in.

BurstGPT (vLLM ``BurstGPTDataset``): keep rows whose ``Model`` is exactly ``GPT-4`` and whose
``Response tokens`` > 0, in file order; draw ``n`` with pandas ``DataFrame.sample(n,
random_state=seed)``. pandas implements that as ``RandomState(seed).choice(len, size=n,
replace=n > len)``, and NumPy's legacy ``choice`` without replacement is
``permutation(len)[:n]``, so NumPy alone reproduces it (pandas is not needed). Column 2 is
the prompt length, column 3 the output length (sent as ``max_tokens``).

Synthetic (no CSV): one long-tailed sequence (log-normal lengths) built block by block so that
its prefixes of 100, 500 and 1000 requests have exactly the totals of the paper's Table 1
(input 77,561 / 381,456 / 768,960 tokens; output the totals the paper measured on the profile's
GPU, :data:`SYNTHETIC_OUTPUT`, or their mean for other profiles) — nested prefixes like vLLM's
seeded samples. The prompts and the shape are the same for every profile (the same random
draws); the longest output of each block is fixed (:data:`LONGEST_OUTPUT`, read off the
paper's durations). It is labelled ``synthetic`` wherever it is reported.

Prompts are built with :func:`bench.sim.textgen.make_prompt`, whose word count is exactly the
intended prompt length under the simulator's token rule.
"""

from __future__ import annotations

import csv
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from bench.sim.textgen import make_prompt

# Prefix sizes and cumulative input tokens of the paper's Table 1 (the same for both GPUs).
SYNTHETIC_INPUT: tuple[tuple[int, int], ...] = ((100, 77_561), (500, 381_456), (1000, 768_960))
# Cumulative output tokens per prefix, per profile (the paper's "vLLM Node" totals, rounded; the
# fractional totals are averages of 50 runs). Other profiles get the mean of the two.
SYNTHETIC_OUTPUT: dict[str, tuple[int, int, int]] = {
    "gpu-s": (7_049, 49_764, 141_408),
    "gpu-l": (6_979, 50_126, 142_778),
}
DEFAULT_OUTPUT = (7_014, 49_945, 142_093)
# The longest output of each block (first 100, next 400, next 500 requests). The paper gives no
# lengths, but a run's duration is the longest request's life, so these are read off the paper's
# durations (docs/simulator.md, "Calibration"); the same for both GPUs, as their BurstGPT sample is.
LONGEST_OUTPUT = (560, 620, 900)
# Beyond 1000 requests: blocks with the overall means.
TAIL_MEANS = (769.0, 142.0)
INPUT_CAP, OUTPUT_CAP = 8192, 2048
SIGMA = 1.0         # prompt lengths: log-normal shape
OUTPUT_SIGMA = 1.4  # output lengths: median about 0.4x the mean, as the paper's E2EL/TPOT medians imply


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    name: str                      # "synthetic" or "burstgpt"
    source: str                    # CSV path or generator description
    prompt_lens: list[int]
    output_lens: list[int]

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def prompt(self, i: int) -> str:
        return make_prompt(self.prompt_lens[i], offset=i)


def sample_indices(pool_size: int, n: int, seed: int) -> list[int]:
    """pandas ``sample(n, random_state=seed)`` positions, via NumPy's legacy RandomState."""
    rng = np.random.RandomState(seed)
    return [int(i) for i in rng.choice(pool_size, size=n, replace=n > pool_size)]


def load_burstgpt(path: str | Path, n: int, seed: int = 0) -> Workload:
    pool: list[tuple[int, int]] = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or len(header) < 4:
            raise ValueError(f"{path}: not a BurstGPT CSV (header {header!r})")
        for lineno, row in enumerate(reader, start=2):
            if len(row) < 4 or row[1] != "GPT-4":
                continue
            try:
                req, resp = int(float(row[2])), int(float(row[3]))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: token counts are not numbers: {row[2:4]!r}") from None
            if resp > 0:
                pool.append((req, resp))
    if not pool:
        raise ValueError(f"{path}: no GPT-4 rows with Response tokens > 0")
    idx = sample_indices(len(pool), n, seed)
    return Workload(name="burstgpt", source=str(path), prompt_lens=[max(1, pool[i][0]) for i in idx],
                    output_lens=[pool[i][1] for i in idx])


def _block(rng: np.random.RandomState, size: int, total: int, cap: int, *, sigma: float,
           longest: int | None = None) -> list[int]:
    """``size`` long-tailed positive ints, each <= cap, summing exactly to ``total``; with
    ``longest``, the largest of them is exactly that and the others are at most that."""
    raw = rng.lognormal(0.0, sigma, size)
    if longest is not None:
        top = int(np.argmax(raw))
        rest = np.delete(raw, top)
        vals = _fit_sum(rest, total - longest, min(cap, longest))
        return [int(v) for v in np.insert(vals, top, longest)]
    return [int(v) for v in _fit_sum(raw, total, cap)]


def _fit_sum(raw: npt.NDArray[np.float64], total: int, cap: int) -> npt.NDArray[np.int_]:
    size = len(raw)
    vals = raw * (total / raw.sum())
    for _ in range(20):  # rescale after clipping until the sum settles
        vals = np.clip(vals, 1, cap)
        vals = vals * (total / vals.sum())
    ints: npt.NDArray[np.int_] = np.clip(np.rint(vals).astype(int), 1, cap)
    diff = total - int(ints.sum())
    order = np.argsort(-ints) if diff < 0 else np.argsort(ints)
    k = 0
    while diff != 0 and k < 100 * size:  # spread the rounding residue one token at a time
        j = order[k % size]
        step = 1 if diff > 0 else -1
        if 1 <= ints[j] + step <= cap:
            ints[j] += step
            diff -= step
        k += 1
    return ints


def synthetic(n: int, seed: int = 0, profile: str | None = None) -> Workload:
    """The synthetic workload of ``n`` requests; ``profile`` picks its output totals."""
    rng = np.random.RandomState(seed)
    out_totals = SYNTHETIC_OUTPUT.get(profile or "", DEFAULT_OUTPUT)
    prompts: list[int] = []
    outputs: list[int] = []
    done, cum_in, cum_out = 0, 0, 0
    for (size, total_in), total_out, longest in zip(SYNTHETIC_INPUT, out_totals, LONGEST_OUTPUT, strict=True):
        if done >= n:
            break
        prompts += _block(rng, size - done, total_in - cum_in, INPUT_CAP, sigma=SIGMA)
        outputs += _block(rng, size - done, total_out - cum_out, OUTPUT_CAP, sigma=OUTPUT_SIGMA,
                          longest=longest)
        done, cum_in, cum_out = size, total_in, total_out
    while done < n:
        size = 1000
        prompts += _block(rng, size, round(TAIL_MEANS[0] * size), INPUT_CAP, sigma=SIGMA)
        outputs += _block(rng, size, round(TAIL_MEANS[1] * size), OUTPUT_CAP, sigma=OUTPUT_SIGMA)
        done += size
    source = (f"log-normal (prompts sigma={SIGMA}, outputs sigma={OUTPUT_SIGMA}, longest outputs "
              f"{'/'.join(map(str, LONGEST_OUTPUT))}) matched to Table 1 totals"
              f"{f' of {profile}' if profile in SYNTHETIC_OUTPUT else ''}, seed {seed}")
    return Workload(name="synthetic", source=source,
                    prompt_lens=prompts[:n], output_lens=outputs[:n])
