"""The table's plots and markdown do not mislead: axes from zero, one colour per target, no
paper column without a paper value. Built from made-up cells; no process is started."""

from __future__ import annotations

import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from bench.table import PALETTE, TARGET_TITLES, Cell, figures, render_markdown

# TPOT medians within 0.5 % of each other: an axis scaled to the data would make this look large
_TPOT = {"direct": 1.0, "gateway": 0.9965, "nginx": 1.001}
_TITLES = {title: target for target, title in TARGET_TITLES.items()} | {
    "paper vLLM Node": "paper", "paper Web Gateway": "paper-gateway"}


def _cells(profile: str) -> list[Cell]:
    return [
        Cell(profile=profile, concurrency=level, target=target,
             metrics={"median_ttft_ms": 20.0 + level / 100 + i, "median_tpot_ms": _TPOT[target],
                      "median_e2el_ms": 300.0 + i, "completed": level, "failed": 0,
                      "total_input_tokens": 1000.0, "total_output_tokens": 500.0})
        for level in (100, 500) for i, target in enumerate(_TPOT)
    ]


@pytest.fixture(scope="module")
def figs() -> dict[str, Figure]:
    return figures(_cells("fast") + _cells("gpu-s"))


def test_absolute_values_are_plotted_from_zero(figs: dict[str, Figure]) -> None:
    for name in ("ttft.png", "tpot.png", "e2el.png"):
        for ax in figs[name].axes:
            assert ax.get_ylim()[0] == 0 and ax.get_xlim()[0] == 0, (name, ax.get_title())
            assert ax.get_ylim()[1] > max(_TPOT.values())


def test_the_overhead_plot_always_shows_its_zero_line(figs: dict[str, Figure]) -> None:
    for ax in figs["overhead.png"].axes:
        low, high = ax.get_ylim()
        assert low <= 0 <= high and ax.get_xlim()[0] == 0


def test_one_colour_per_target_across_every_plot(figs: dict[str, Figure]) -> None:
    seen: dict[str, set[str]] = {}
    for fig in figs.values():
        for ax in fig.axes:
            for line in ax.get_lines():
                label = line.get_label()
                target = _TITLES.get(label) or label.split(":")[0]  # overhead: "gateway: TTFT"
                if target in PALETTE:
                    seen.setdefault(target, set()).add(to_hex(line.get_color()))
    assert {"direct", "gateway", "nginx"} <= set(seen)  # the paper line appears only with paper values
    assert seen == {target: {to_hex(PALETTE[target])} for target in seen}


def test_no_all_na_paper_columns() -> None:
    header = {"git_commit": "abc", "date": "today", "machine": "m"}
    quick = render_markdown(_cells("fast"), "SYNTHETIC", header)
    assert "paper vLLM Node" not in quick  # the paper has no "fast" profile
    full = render_markdown(_cells("gpu-s"), "SYNTHETIC", header)
    assert "100 paper vLLM Node" in full and "500 paper vLLM Node" in full
    assert "100 paper Web Gateway" in full and "| 100 | paper Web Gateway | -69.6 (-17 %)" in full
