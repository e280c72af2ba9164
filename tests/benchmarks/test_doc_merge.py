"""benchmarks.doc_merge: an ``--only`` run keeps the other benchmarks' rows, sections and marked blocks once."""

from __future__ import annotations

from benchmarks.doc_merge import merge

HEAD = "# Benchmarks\n\n| benchmark | measured | target | verdict |\n|---|---|---|---|\n"
BLOCKS = "\n<!-- peers:begin -->\n## peers\nP\n<!-- peers:end -->\n\n<!-- dp_cost:begin -->\nD\n<!-- dp_cost:end -->\n"


def test_only_run_keeps_other_rows_sections_and_each_marked_block_once():
    old = (HEAD + "| Privacy cost (fusion) | 1.9 | ≤ 2.0 | met |\n| Scale (100 sites) | 3 GB | report | - |\n"
           "\n## Details\n\n### Privacy cost\n\nold dp\n\n### Scale\n\nold scale\n" + BLOCKS)
    new = HEAD + "| Privacy cost (fusion) | 1.4 | ≤ 1.5 | met |\n\n## Details\n\n### Privacy cost\n\nnew dp\n" + BLOCKS
    page = merge(old, new, ran={"dp"})
    assert "| Privacy cost (fusion) | 1.4 |" in page and "| Privacy cost (fusion) | 1.9 |" not in page
    assert "| Scale (100 sites) | 3 GB |" in page and "old scale" in page and "new dp" in page and "old dp" not in page
    for marker in ("<!-- peers:begin -->", "<!-- dp_cost:begin -->"):
        assert page.count(marker) == 1
    assert page.index("old scale") < page.index("<!-- peers:begin -->")  # blocks after the sections


def test_every_hand_written_section_of_the_page_survives_a_rerun():
    """``python -m benchmarks`` rebuilds docs/benchmarks.md from its own sections and the marked
    blocks; a ``## `` section outside a block would be dropped by the next run (it happened once:
    two sessions' sections vanished, caught in review)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text()
    outside = re.sub(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", "", page, flags=re.DOTALL)
    assert [h for h in re.findall(r"^## .*$", outside, flags=re.M) if h != "## Details"] == []
