"""Partitioners: patient-level, complete, seeded; label skew grows as α shrinks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmed.experiments.partition import (
    PARTITIONERS,
    get_partitioner,
    partition_table,
    patient_labels,
    write_partitions,
)


def _samples(n_patients: int = 300, seed: int = 0) -> pd.DataFrame:
    """Several samples per patient (like HAM10000 lesions), 3 classes, 3 source sites."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        label = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
        site = f"src{i % 3}"
        for _ in range(int(rng.integers(1, 4))):
            rows.append({"patient_id": f"{site}/p{i:04d}", "label": label, "site": site})
    return pd.DataFrame(rows)


CASES = [  # (name, kwargs)
    ("natural", {}),
    ("iid", {"num_sites": 5}),
    ("dirichlet", {"num_sites": 5, "alpha": 0.3}),
    ("dirichlet", {"num_sites": 4, "alpha": 100.0}),
    ("quantity", {"num_sites": 6, "alpha": 0.5}),
]


@pytest.mark.parametrize("name,kwargs", CASES)
def test_partition_is_patient_level_and_complete(name: str, kwargs: dict) -> None:
    samples = _samples()
    parts = get_partitioner(name)(samples, seed=3, **kwargs)
    if "num_sites" in kwargs:
        assert len(parts) == kwargs["num_sites"]
    ids = [p for v in parts.values() for p in v]
    assert len(ids) == len(set(ids)), "a patient is in two sites"
    assert set(ids) == set(samples["patient_id"]), "patients lost or invented"
    assert all(len(v) > 0 for v in parts.values())
    # patient-level: every sample of a patient follows its patient
    owner = {p: s for s, v in parts.items() for p in v}
    assert samples.groupby("patient_id")["patient_id"].apply(lambda g: len({owner[x] for x in g})).max() == 1


@pytest.mark.parametrize("name,kwargs", CASES)
def test_partition_is_deterministic_per_seed(name: str, kwargs: dict) -> None:
    samples = _samples()
    fn = get_partitioner(name)
    assert fn(samples, seed=7, **kwargs) == fn(samples, seed=7, **kwargs)
    if name != "natural":
        assert fn(samples, seed=7, **kwargs) != fn(samples, seed=8, **kwargs)


def _skew(samples: pd.DataFrame, parts: dict[str, list[str]]) -> float:
    """Mean total-variation distance between each site's label mix and the pooled mix."""
    labels = patient_labels(samples)
    pooled = np.bincount(labels, minlength=3) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels.loc[ids], minlength=3) / len(ids) - pooled).sum()
          for ids in parts.values()]
    return float(np.mean(tv))


def test_small_alpha_dirichlet_is_more_skewed_than_iid() -> None:
    samples = _samples(600)
    for seed in range(3):
        iid = get_partitioner("iid")(samples, num_sites=5, seed=seed)
        skewed = get_partitioner("dirichlet")(samples, num_sites=5, alpha=0.1, seed=seed)
        assert _skew(samples, skewed) > _skew(samples, iid) + 0.1


def test_quantity_small_alpha_gives_unequal_sizes() -> None:
    samples = _samples(600)
    sizes = [len(v) for v in get_partitioner("quantity")(samples, num_sites=5, alpha=0.2, seed=0).values()]
    equal = [len(v) for v in get_partitioner("iid")(samples, num_sites=5, seed=0).values()]
    assert max(sizes) - min(sizes) > 3 * (max(equal) - min(equal) + 1)


@pytest.mark.parametrize("bad,match", [
    (lambda: get_partitioner("nope"), "valid: dirichlet, iid, natural, quantity"),
    (lambda: get_partitioner("dirichlet")(_samples(), num_sites=3, alpha=0), "alpha > 0"),
    (lambda: get_partitioner("iid")(_samples(20), num_sites=50), "cannot split"),
    (lambda: get_partitioner("natural")(_samples(), num_sites=7), "has 3 sites"),
])
def test_errors_say_how_to_fix(bad, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bad()


def test_registry_names() -> None:
    assert sorted(PARTITIONERS) == ["dirichlet", "iid", "natural", "quantity"]


def test_table_lists_every_site_and_the_total() -> None:
    samples = _samples()
    parts = get_partitioner("iid")(samples, num_sites=3, seed=0)
    table = partition_table(samples, parts, classes=["a", "b", "c"])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["site", "patients", "samples"]
    assert sum(line.startswith("site_") for line in lines) == 3
    assert lines[-1].split()[:3] == ["all", str(samples["patient_id"].nunique()), str(len(samples))]


def test_written_partitions_load_as_ordinary_sites(synth_root: Path, tmp_path: Path) -> None:
    import yaml

    from fedmed.config import DataConfig
    from fedmed.data.site import SiteDataError, combine_sites, load_site
    from fedmed.experiments.partition import image_roots_of

    data = DataConfig.model_validate(yaml.safe_load((synth_root / "fedmed-data.yaml").read_text())["data"])
    pooled = combine_sites([load_site(synth_root / s, data) for s in ("hospital_a", "hospital_b")])
    parts = get_partitioner("dirichlet")(pooled.samples, num_sites=3, alpha=0.5, seed=0)
    written = write_partitions(pooled, parts, tmp_path / "parts", classes=data.classes, meta={"alpha": 0.5})
    assert (tmp_path / "parts" / "partition.json").exists()
    with pytest.raises(SiteDataError, match="image_roots"):  # outside paths need an explicit allowance
        load_site(next(iter(written.values())), data)
    data = data.model_copy(update={"image_roots": image_roots_of(pooled)})
    total, images = 0, 0
    for site, folder in written.items():
        loaded = load_site(folder, data)
        assert set(loaded.samples["patient_id"]) == set(parts[site])
        paths = loaded.samples.loc[loaded.samples["has_image"], "image_path"]
        assert all(Path(p).is_absolute() for p in paths)  # referenced, not copied
        assert not (folder / "images").exists()
        total, images = total + len(loaded.samples), images + len(paths)
    assert total == len(pooled.samples)
    assert images == int(pooled.samples["has_image"].sum())
