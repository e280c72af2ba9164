"""Generic folder+CSV importer, plus the shared importer helpers (registry, write_site)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fedmed.config import load_config
from fedmed.data.importers import (
    IMPORTERS,
    DatasetImportError,
    ImportReport,
    get_importer,
    import_folder,
    write_dataset_config,
    write_site,
)

TABLE = [
    # image, patient_id, label, hospital, age, smoker
    ("a/p1_1.png", "p001", "pneumonia", "north", "61", "yes"),
    ("a/p1_2.png", "p001", "pneumonia", "north", "62", "yes"),
    ("b/p2.png", "p002", "normal", "north", "", "no"),
    ("p3.png", "p003", "normal", "south", "45", ""),
]


def _source(tmp: Path, rows=TABLE, *, make_images: bool = True) -> tuple[Path, Path]:
    images = tmp / "imgs"
    for rel, *_ in rows:
        if make_images:
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 128).save(images / rel)
    images.mkdir(exist_ok=True)
    table = tmp / "table.csv"
    pd.DataFrame(rows, columns=["image", "patient_id", "label", "hospital", "age",
                                "smoker"]).to_csv(table, index=False)
    return images, table


def test_single_site(tmp_path: Path) -> None:
    images, table = _source(tmp_path)
    report = import_folder(images, table, tmp_path / "out", site_name="clinic")
    rec = pd.read_csv(tmp_path / "out" / "clinic" / "records.csv", dtype=str,
                      keep_default_na=False)
    assert list(rec.columns) == ["patient_id", "hospital", "age", "smoker"]  # labels are per image
    assert list(rec["patient_id"]) == ["p001", "p002", "p003"]  # ids keep leading zeros
    assert list(rec["age"]) == ["61", "", "45"]  # first row per patient, gaps empty
    img = pd.read_csv(tmp_path / "out" / "clinic" / "images.csv")
    assert len(img) == 4 and all(Path(p).is_file() for p in img["image"])
    assert report.sites["clinic"]["patients"] == 3
    assert any("disagree on feature" in n for n in report.notes)  # p001's age 61 vs 62
    cfg = load_config(report.config_path)
    assert cfg.data.classes == ["normal", "pneumonia"]
    assert "age" in cfg.data.numeric and cfg.data.categorical["smoker"] == ["no", "yes"]


def test_multi_site(tmp_path: Path) -> None:
    images, table = _source(tmp_path)
    report = import_folder(images, table, tmp_path / "out", site_column="hospital")
    assert sorted(report.sites) == ["north", "south"]
    rec = pd.read_csv(tmp_path / "out" / "north" / "records.csv")
    assert "hospital" not in rec.columns and len(rec) == 2
    assert report.sites["south"]["label_counts"] == {"normal": 1}
    assert "north" in report.table() and "total" in report.table()


@pytest.mark.parametrize(
    ("change", "kwargs", "expect"),
    [
        ("none", {"label_column": "diagnosis"}, "missing column(s) ['diagnosis']"),
        ("no_image_file", {}, "1 image file(s) in column 'image' do not exist"),
        ("empty_id", {}, "column 'patient_id' is empty on 1 row(s), first at line 3"),
        ("two_sites", {"site_column": "hospital"}, "more than one value of column 'hospital'"),
        ("bad_site", {"site_column": "hospital"}, "not a valid folder name"),
    ],
)
def test_errors_name_file_and_column(tmp_path: Path, change: str, kwargs: dict,
                                     expect: str) -> None:
    rows = [list(r) for r in TABLE]
    if change == "empty_id":
        rows[1][1] = ""
    if change == "two_sites":
        rows[1][3] = "south"
    if change == "bad_site":
        rows[3][3] = "south wing/2"
    images, table = _source(tmp_path, rows)
    if change == "no_image_file":
        (images / "b" / "p2.png").unlink()
    with pytest.raises(DatasetImportError) as err:
        import_folder(images, table, tmp_path / "out", **kwargs)
    msg = str(err.value)
    assert expect in msg
    assert "table.csv" in msg or change == "bad_site"
    assert "p00" not in msg and "p2.png" not in msg  # no ids, no file names of patients
    assert not (tmp_path / "out").exists()


def test_missing_table_and_folder(tmp_path: Path) -> None:
    images, table = _source(tmp_path)
    with pytest.raises(DatasetImportError, match="table not found"):
        import_folder(images, tmp_path / "nope.csv", tmp_path / "out")
    with pytest.raises(DatasetImportError, match="image folder not found"):
        import_folder(tmp_path / "nope", table, tmp_path / "out")


# ---------------------------------------------------------------- shared helpers

def test_registry_lists_valid_names() -> None:
    assert set(IMPORTERS) == {"ham10000", "heart-disease", "folder", "synth"}
    assert get_importer("folder") is import_folder
    with pytest.raises(ValueError, match="folder, ham10000, heart-disease, synth"):
        get_importer("dicomdir")


def test_write_site_contract(tmp_path: Path) -> None:
    rec = pd.DataFrame({"age": [50.0, None], "label": ["a", "b"], "patient_id": ["1", "2"]})
    site = write_site(tmp_path, "s1", records=rec, images=None)
    assert (site / "records.csv").read_text().splitlines() == [
        "patient_id,label,age", "1,a,50.0", "2,b,"]
    (site / "images.csv").write_text("image,patient_id\nx.png,1\n")
    write_site(tmp_path, "s1", records=rec, images=None)
    assert not (site / "images.csv").exists()  # stale table removed
    with pytest.raises(DatasetImportError, match="more than one row"):
        write_site(tmp_path, "s1", records=pd.concat([rec, rec]), images=None)
    with pytest.raises(DatasetImportError, match="missing required column"):
        write_site(tmp_path, "s1", records=rec.drop(columns="label"), images=None)
    with pytest.raises(DatasetImportError, match="not a valid folder name"):
        write_site(tmp_path, "../evil", records=rec, images=None)
    with pytest.raises(DatasetImportError, match="not a valid folder name"):
        write_site(tmp_path, "..", records=rec, images=None)


def test_dataset_config_is_a_valid_config(tmp_path: Path) -> None:
    path = write_dataset_config(tmp_path, classes=["no", "yes"], numeric=["x"],
                                categorical={"code": [1, 2]}, notes_column="notes",
                                channels=3, image_size=32)
    cfg = load_config(path)
    assert cfg.data.classes == ["no", "yes"]  # YAML keeps them strings, not booleans
    assert cfg.data.categorical == {"code": ["1", "2"]}
    assert cfg.data.channels == 3 and cfg.data.image_size == 32
    assert Path(cfg.data.root) == tmp_path.resolve()


def test_report_table_is_aligned() -> None:
    report = ImportReport(out_dir=Path("."), classes=["neg", "pos"], sites={
        "a": {"patients": 5, "records": 5, "images": 0, "label_counts": {"neg": 5}},
        "long_site": {"patients": 120, "records": 100, "images": 130,
                      "label_counts": {"neg": 60, "pos": 90}},
    })
    lines = report.table().splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[-1].split() == ["total", "125", "105", "130", "65", "90"]
