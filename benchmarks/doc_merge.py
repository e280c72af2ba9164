"""Keep what ``python -m benchmarks --only ...`` did not re-run in docs/benchmarks.md.

``write_doc`` builds the page from this run's results only; without this, running one
benchmark would drop every other benchmark's rows and section from the page. Rows of the
headline table and ``###`` sections are owned by a benchmark through their leading words;
those of benchmarks that ran are replaced, the others are carried over as they were.
"""

from __future__ import annotations

__all__ = ["OWNERS", "merge"]

# benchmark -> leading words of its table rows and section headings
OWNERS: dict[str, tuple[str, ...]] = {
    "trainer": ("Trainer",),
    "dp": ("Privacy cost",),
    "pretrained": ("Pretrained", "Privacy cost, pretrained"),
    "data_path": ("Data path",),
    "federation": ("Federation", "Overhead,", "Network", "fp16", "Direct baseline", "Cuts", "Deployment wall"),
    "scale": ("Scale", "Model size"),
}


def _owner(text: str) -> str | None:
    best, owner = 0, None
    for name, words in OWNERS.items():
        for w in words:
            if text.startswith(w) and len(w) > best:
                best, owner = len(w), name
    return owner


def _blocks(page: str) -> tuple[str, str]:
    """(page, its trailing ``<!-- name:begin -->`` blocks): write_doc appends those after the sections."""
    at = page.find("\n<!-- ")
    return (page, "") if at < 0 else (page[:at], page[at:])


def _parts(page: str) -> tuple[list[str], list[str], list[str]]:
    """(table rows, sections, everything before the table) of a page write_doc made."""
    head, _, rest = _blocks(page)[0].partition("| benchmark | measured | target | verdict |\n|---|---|---|---|\n")
    table, _, details = rest.partition("\n## Details\n")
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    sections = ["### " + s.strip("\n") for s in ("\n" + details.lstrip("\n")).split("\n### ")[1:]]
    return rows, sections, [head]


def merge(old: str, new: str, *, ran: set[str]) -> str:
    """``new`` plus the rows and sections of ``old`` owned by benchmarks not in ``ran``."""
    if not old.strip():
        return new
    old_rows, old_sections, _ = _parts(old)
    new_rows, new_sections, _ = _parts(new)
    keep_rows = [r for r in old_rows if (o := _owner(r[2:])) is not None and o not in ran]
    keep_sections = [s for s in old_sections if (o := _owner(s[4:])) is not None and o not in ran]
    if not keep_rows and not keep_sections:
        return new
    head, _, rest = new.partition("| benchmark | measured | target | verdict |\n|---|---|---|---|\n")
    note = ("Rows and sections of benchmarks this run did not repeat are carried over from the previous "
            "page (their numbers come from that run; see the page's git history).\n\n")
    table = "\n".join(new_rows + keep_rows) + "\n"
    details = "\n\n".join(new_sections + keep_sections) + "\n"
    # the marked blocks are new's own (write_doc carried them over): once, after the sections
    return (head + note + "| benchmark | measured | target | verdict |\n|---|---|---|---|\n" + table
            + "\n## Details\n\n" + details + _blocks(new)[1])
