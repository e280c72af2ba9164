"""The benchmark's bookkeeping (no timing): the wall-time split adds up, --only keeps the page."""

from __future__ import annotations

import pytest

from benchmarks.doc_merge import merge
from benchmarks.federation import split


def _row(start: float, *, seconds: float, train: float, crit: float, other: float) -> dict:
    return {"clock": {"start": start}, "seconds": seconds,
            "timing": {"wait_sites": 0.5, "train": train, "aggregate": 0.1, "site_eval": 0.0, "central_eval": 0.4},
            "train_per_site": {"a": {"train_seconds": crit}, "b": {"train_seconds": other}}}


def test_split_adds_up_to_the_wall_and_names_the_slowest_sites_training():
    history = [_row(110.0, seconds=10.0, train=9.0, crit=7.0, other=3.0),
               _row(121.0, seconds=8.0, train=7.0, crit=6.0, other=6.5)]
    parts = split(history, launch=100.0, end=135.0, app_s={"a": [7.5, 6.1], "b": [3.2, 6.6]})
    assert parts["startup"] == pytest.approx(10.0 + 1.0)   # launch → round 1, and both waits for sites
    assert parts["critical"] == pytest.approx(7.0 + 6.5)  # the slowest site of each round
    assert parts["site_setup"] == pytest.approx(0.5)       # round 1: app 7.5 s for 7 s of training
    assert parts["reporting"] == pytest.approx(1.0)        # 120 → 121 between the rounds
    assert parts["after"] == pytest.approx(135.0 - 129.0)
    assert sum(parts.values()) == pytest.approx(35.0, abs=1e-9)


PAGE = """# Benchmarks

old header

| benchmark | measured | target | verdict |
|---|---|---|---|
| Trainer efficiency (x) | 1.0 | ≥ 0.95 | met |
| Federation overhead, old | 1.1 | ≤ 1.15 | met |

## Details

### Trainer efficiency

trainer text

### Federation overhead and network

old federation text
"""


def test_only_keeps_the_rows_and_sections_of_the_benchmarks_it_did_not_run():
    new = PAGE.replace("old header", "new header").replace("| Trainer efficiency (x) | 1.0 | ≥ 0.95 | met |\n", "") \
        .replace("| Federation overhead, old | 1.1", "| Overhead, deployment, 20 rounds | 1.2") \
        .replace("### Trainer efficiency\n\ntrainer text\n\n", "").replace("old federation text", "new text")
    page = merge(PAGE, new, ran={"federation"})
    assert "new header" in page and "Overhead, deployment, 20 rounds" in page and "new text" in page
    assert "Trainer efficiency (x)" in page and "trainer text" in page  # not re-run: carried over
    assert "Federation overhead, old" not in page and "old federation text" not in page
    assert merge("", new, ran={"federation"}) == new
