"""Config loading: typed, strict, file-relative paths, key=value overrides."""

from __future__ import annotations

from pathlib import Path

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
    (BASE + "federation:\n  calibration: platt\n", "federation.calibration"),
    (BASE + "federation:\n  calibration: central\n", "set federation.central_test"),
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
    path.write_text("site: hospital_a\ndata_dir: a\npolicy:\n  max_epsilon: 3\n")
    site = load_site_config(path)
    assert site.data_dir == str((tmp_path / "a").resolve()) and site.policy.max_epsilon == 3
    path.write_text("site: hospital a\ndata_dir: a\n")
    with pytest.raises(ConfigError, match="site"):
        load_site_config(path)


def test_calibration_setting():
    raw = {"data": {"classes": ["a", "b"]}}
    assert load_config(raw=raw).federation.calibration == "federated"
    cfg = load_config(raw=raw, overrides=["federation.calibration=central", "federation.central_test=c"])
    assert cfg.federation.calibration == "central"
    for off in ("off", "false", "\"off\""):  # a bare YAML `off` is false
        assert load_config(raw=raw, overrides=[f"federation.calibration={off}"]).federation.calibration == "off"


def test_calibration_does_not_change_the_resume_fingerprint():
    """Calibration runs after the rounds: a finished run can be resumed to calibrate differently."""
    from fedmed.server.federation import config_hash

    raw = {"data": {"classes": ["a", "b"]}}
    base = config_hash(load_config(raw=raw))
    assert config_hash(load_config(raw=raw, overrides=["federation.calibration=off"])) == base
    assert config_hash(load_config(raw=raw, overrides=["federation.local_epochs=3"])) != base


def test_site_example_documents_every_policy_key():
    """configs/site_example.yaml loads and shows every key of the site policy (docs stay true)."""
    from fedmed.config import SitePolicy

    repo = Path(__file__).resolve().parents[1]
    site = load_site_config(repo / "configs" / "site_example.yaml")
    text = (repo / "configs" / "site_example.yaml").read_text()
    assert set(SitePolicy.model_fields) <= {k for k in SitePolicy.model_fields if f"  {k}:" in text}
    assert site.policy.min_batch_size >= 16 and site.policy.allow_notes is False


def test_old_top_level_caps_say_where_they_moved(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("site: a\ndata_dir: a\nmax_epsilon: 3\n")
    with pytest.raises(ConfigError, match="policy"):
        load_site_config(path)
