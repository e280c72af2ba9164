"""UCI heart-disease importer: real-data counts (shared data) and malformed-line errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedmed.config import load_config
from fedmed.data.importers import DatasetImportError, import_heart_disease
from fedmed.data.importers.heart_disease import (
    HEART_CATEGORICAL,
    HEART_CLASSES,
    HEART_NUMERIC,
    HEART_SITES,
)

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
UCI = SHARED / "uci-heart-disease"
needs_shared = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not UCI.is_dir(), reason="needs ../shared/data (absent on a fresh clone)"),
]
README_ROWS = {"cleveland": 303, "hungarian": 294, "switzerland": 123, "va": 200}


@pytest.fixture(scope="module")
def uci_out(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("uci")
    return out, import_heart_disease(UCI, out)


def _records(out: Path, site: str) -> pd.DataFrame:
    return pd.read_csv(out / site / "records.csv", dtype=str, keep_default_na=False)


class TestRealData:
    pytestmark = needs_shared

    def test_row_counts_and_layout(self, uci_out) -> None:
        out, report = uci_out
        assert {s: v["records"] for s, v in report.sites.items()} == README_ROWS
        for site, n in README_ROWS.items():
            rec = _records(out, site)
            assert len(rec) == n
            assert list(rec.columns) == ["patient_id", "label", *HEART_NUMERIC,
                                         *HEART_CATEGORICAL]
            assert not (out / site / "images.csv").exists()  # records-only sites
            assert rec["patient_id"].iloc[0] == f"{site}-1"
            assert not rec["patient_id"].duplicated().any()
            assert set(rec["label"]) == set(HEART_CLASSES)

    def test_categories_are_integer_strings(self, uci_out) -> None:
        out, _ = uci_out
        for site in README_ROWS:
            rec = _records(out, site)
            for col, vocab in HEART_CATEGORICAL.items():
                assert set(rec[col]) - {""} <= set(vocab), col

    def test_zero_cholesterol_is_missing(self, uci_out) -> None:
        out, _ = uci_out
        swiss = _records(out, "switzerland")
        assert (swiss["chol"] == "").all()  # every Swiss chol is 0 in the source
        for site in README_ROWS:
            chol = pd.to_numeric(_records(out, site)["chol"], errors="coerce")
            assert not (chol == 0).any()

    def test_disease_label_from_num(self, uci_out) -> None:
        out, report = uci_out
        # Cleveland: 164 with num == 0 in the UCI file.
        assert report.sites["cleveland"]["label_counts"] == {"no_disease": 164, "disease": 139}
        cfg = load_config(report.config_path)
        assert cfg.data.classes == HEART_CLASSES and cfg.data.numeric == HEART_NUMERIC
        assert cfg.data.categorical["thal"] == ["3", "6", "7"]


# ---------------------------------------------------------------- tiny fake sources

GOOD = "63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0\n"


def _fake(root: Path, lines: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True)
    for site in HEART_SITES:
        text = (lines or {}).get(site, GOOD + GOOD.replace(",0\n", ",2\n"))
        (root / f"processed.{site}.data").write_text(text)
    return root


def test_fake_source_imports(tmp_path: Path) -> None:
    report = import_heart_disease(_fake(tmp_path / "src"), tmp_path / "out")
    rec = _records(tmp_path / "out", "va")
    assert list(rec["label"]) == ["no_disease", "disease"]
    assert rec["cp"].iloc[0] == "1" and rec["thal"].iloc[0] == "6"
    assert report.sites["va"]["patients"] == 2


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (GOOD + "63,1,1,145\n", "line 2: 4 fields, expected 14"),
        (GOOD + GOOD.replace("233.0", "abc"), "line 2: column 'chol' is not a number"),
        (GOOD.replace("6.0,0", "5.0,0"), "line 1: column 'thal' is outside"),
        (GOOD.replace(",0\n", ",?\n"), "line 1: column 'num'"),
        ("", "no data lines"),
    ],
    ids=["field_count", "non_numeric", "bad_code", "missing_target", "empty"],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, text: str, expect: str) -> None:
    src = _fake(tmp_path / "src", {"hungarian": text})
    with pytest.raises(DatasetImportError) as err:
        import_heart_disease(src, tmp_path / "out")
    msg = str(err.value)
    assert "processed.hungarian.data" in msg and expect in msg
    assert "233" not in msg and "abc" not in msg  # no raw values
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path: Path) -> None:
    src = _fake(tmp_path / "src")
    (src / "processed.va.data").unlink()
    with pytest.raises(DatasetImportError, match=r"processed\.va\.data"):
        import_heart_disease(src, tmp_path / "out")
