"""Config loading: typed, strict, file-relative paths, key=value overrides."""

from __future__ import annotations

import pytest

from fedmed.config import ConfigError, load_config, load_site_config, parse_overrides

BASE = "data:\n  classes: [a, b]\n  root: data\n"


@pytest.mark.parametrize("text, needle", [
    (BASE + "trian:\n  epochs: 3\n", "trian: unknown key"),
    (BASE + "train:\n  epochs: many\n", "train.epochs"),
    (BASE + "train:\n  lr: 5\n", "train.lr"),
    (BASE + "model:\n  embed_dim: 30\n  heads: 4\n", "divisible"),
    ("data:\n  classes: [a]\n", "data.classes"),
    ("- just\n- a list\n", "mapping"),
])
def test_invalid_config_names_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert needle in str(exc.value)
    assert str(path) in str(exc.value) or "bad.yaml" in str(exc.value)


def test_overrides_and_relative_paths(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    cfg = load_config(path, ["train.epochs=7", "model.variant=record", "data.sites=[x, y]"])
    assert cfg.train.epochs == 7 and cfg.model.variant == "record" and cfg.data.sites == ["x", "y"]
    assert cfg.data.root == str((tmp_path / "data").resolve())


def test_bad_override_is_clear():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_site_config(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("site: hospital_a\ndata_dir: a\nmax_epsilon: 3\n")
    site = load_site_config(path)
    assert site.data_dir == str((tmp_path / "a").resolve()) and site.max_epsilon == 3
    path.write_text("site: hospital a\ndata_dir: a\n")
    with pytest.raises(ConfigError, match="site"):
        load_site_config(path)
