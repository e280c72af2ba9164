"""HAM10000 importer: real-data counts (shared data) and source validation (tiny fakes)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fedmed.config import load_config
from fedmed.data.importers import DatasetImportError, import_ham10000
from fedmed.data.importers.ham10000 import HAM_CLASSES, METADATA_FILE
from fedmed.data.site import load_site

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
HAM = SHARED / "ham10000"
CONFIGS = Path(__file__).resolve().parents[3] / "configs"
needs_shared = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not HAM.is_dir(), reason="needs ../shared/data (absent on a fresh clone)"),
]

README_IMAGES = {"vidir_molemax": 1935, "vidir_modern": 796, "rosendahl": 763, "vienna_dias": 138}
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]


@pytest.fixture(scope="module")
def ham_out(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ham")
    return out, import_ham10000(HAM, out)


class TestRealData:
    pytestmark = needs_shared

    def test_site_counts_match_readme(self, ham_out) -> None:
        out, report = ham_out
        assert {s: v["images"] for s, v in report.sites.items()} == README_IMAGES
        for site, n in README_IMAGES.items():
            assert len(pd.read_csv(out / site / "images.csv")) == n

    def test_records_have_only_allowed_features(self, ham_out) -> None:
        out, _ = ham_out
        for site in README_IMAGES:
            rec = pd.read_csv(out / site / "records.csv", dtype=str, keep_default_na=False)
            assert list(rec.columns) == ["patient_id", "label", "age", "sex", "localization"]
            assert "dx_type" not in rec.columns and "image_id" not in rec.columns
            assert not rec["patient_id"].duplicated().any()  # one row per lesion
            assert "unknown" not in set(rec["sex"]) | set(rec["localization"])
            assert set(rec["label"]) <= set(HAM_CLASSES)

    def test_no_lesion_on_two_sites_and_images_exist(self, ham_out) -> None:
        out, _ = ham_out
        seen: set[str] = set()
        for site in README_IMAGES:
            img = pd.read_csv(out / site / "images.csv", dtype=str)
            rec = pd.read_csv(out / site / "records.csv", dtype=str)
            assert set(img["patient_id"]) == set(rec["patient_id"])
            assert not seen & set(rec["patient_id"])
            seen |= set(rec["patient_id"])
            assert all(Path(p).is_absolute() for p in img["image"])
            assert Path(img["image"].iloc[0]).is_file()

    def test_config_snippet_loads(self, ham_out) -> None:
        out, report = ham_out
        cfg = load_config(report.config_path)
        assert cfg.data.classes == HAM_CLASSES
        assert cfg.data.channels == 3 and cfg.data.numeric == ["age"]
        assert cfg.data.categorical["sex"] == ["female", "male"]
        assert "unknown" not in cfg.data.categorical["localization"]
        assert Path(cfg.data.root) == out.resolve()
        assert "vienna_dias" in report.table()

    @pytest.mark.parametrize("config", ["ham10000.yaml", "ham10000_pretrained.yaml"])
    def test_shipped_configs_reach_the_imported_images(self, ham_out, config: str) -> None:
        """The recipes' configs list the shared image folder in ``image_roots``: without it the
        site's path confinement refuses every image the import left in place."""
        out, _ = ham_out
        cfg = load_config(CONFIGS / config, [f"data.root={out}"])
        site = load_site(out / "vienna_dias", cfg.data)
        assert site.summary.images == README_IMAGES["vienna_dias"]


# ---------------------------------------------------------------- tiny fake sources

def _fake_source(root: Path, rows: list[list[str]], *, images: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(root / METADATA_FILE, index=False)
    if images:
        for r in rows:
            Image.new("RGB", (8, 8), (200, 120, 90)).save(root / "images" / f"{r[1]}.jpg")
    return root


ROWS = [
    ["HAM_1", "ISIC_1", "mel", "histo", "50.0", "male", "back", "rosendahl"],
    ["HAM_1", "ISIC_2", "mel", "histo", "55.0", "male", "back", "rosendahl"],
    ["HAM_2", "ISIC_3", "nv", "follow_up", "", "unknown", "unknown", "vidir_modern"],
]


def test_copy_images_and_disagreeing_lesion(tmp_path: Path) -> None:
    src = _fake_source(tmp_path / "src", ROWS)
    report = import_ham10000(src, tmp_path / "out", copy_images=True)
    img = pd.read_csv(tmp_path / "out" / "rosendahl" / "images.csv")
    assert list(img["image"]) == ["images/ISIC_1.jpg", "images/ISIC_2.jpg"]
    assert (tmp_path / "out" / "rosendahl" / "images" / "ISIC_2.jpg").is_file()
    rec = pd.read_csv(tmp_path / "out" / "rosendahl" / "records.csv")
    assert len(rec) == 1 and rec["age"].iloc[0] == 50.0  # first image's values kept
    assert report.sites["rosendahl"] == {"patients": 1, "records": 1, "images": 2,
                                         "label_counts": {"mel": 2}}
    assert any("1 lesion" in n for n in report.notes)
    other = pd.read_csv(tmp_path / "out" / "vidir_modern" / "records.csv")
    assert other[["age", "sex", "localization"]].isna().all(axis=None)  # gaps stay empty
    import_ham10000(src, tmp_path / "out", copy_images=True)  # re-import overwrites


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("no_metadata", METADATA_FILE),
        ("missing_column", "missing column(s) ['dataset']"),
        ("missing_image", "ISIC_3.jpg"),
        ("bad_dx", "column 'dx'"),
        ("lesion_two_sites", "more than one 'dataset'"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path: Path, case: str, expect: str) -> None:
    rows = [list(r) for r in ROWS]
    if case == "bad_dx":
        rows[2][2] = "melanoma"
    if case == "lesion_two_sites":
        rows[1][7] = "vienna_dias"
    src = _fake_source(tmp_path / "src", rows)
    if case == "no_metadata":
        (src / METADATA_FILE).unlink()
    if case == "missing_column":
        pd.read_csv(src / METADATA_FILE).drop(columns="dataset").to_csv(src / METADATA_FILE,
                                                                        index=False)
    if case == "missing_image":
        (src / "images" / "ISIC_3.jpg").unlink()
    with pytest.raises(DatasetImportError) as err:
        import_ham10000(src, tmp_path / "out")
    msg = str(err.value)
    assert expect in msg
    assert "HAM_1" not in msg and "HAM_2" not in msg  # never a patient id
    assert not (tmp_path / "out").exists()  # validated before anything was written
