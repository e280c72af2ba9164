"""Shared fixtures: a small synthetic multi-site cohort and configs that use it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 hospitals (120/90/70 patients) + a central held-out set, 32×32 DICOM."""
    from fedmed.data.importers.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, sites=3, patients_per_site=[120, 90, 70], image_size=32, seed=1, central=120)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image-cache")
    os.environ["FEDMED_CACHE_DIR"] = str(path)
    return path


def _synth_config(root: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small, fast config for the synthetic cohort; ``sections`` update its sections."""
    data = yaml.safe_load((root / "fedmed-data.yaml").read_text())["data"]
    data.update(root=str(root), image_size=32, sites=["hospital_a", "hospital_b", "hospital_c"])
    cfg: dict[str, Any] = {
        "name": "synth-test",
        "output_dir": str(out),
        "data": data,
        "model": {"embed_dim": 32, "record_layers": 1, "heads": 2, "fusion_heads": 2},
        "train": {"batch_size": 16, "lr": 0.001, "epochs": 20, "patience": 8, "progress": False},
        "federation": {"rounds": 3, "min_sites": 3, "local_epochs": 2, "round_timeout": 240,
                       "central_test": str(root / "central")},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture
def synth_config(synth_root: Path, cache_dir: Path, tmp_path: Path):
    """Factory: ``synth_config(**sections) -> (config dict, path of its YAML)``."""

    def make(**sections: dict[str, Any]) -> tuple[dict[str, Any], Path]:
        cfg = _synth_config(synth_root, tmp_path / "runs", **sections)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return cfg, path

    return make


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("needs ../shared/data (absent on a fresh clone)")
    return SHARED_DATA
