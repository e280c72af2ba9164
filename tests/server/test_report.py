"""HTML report and terminal table from synthetic histories (with and without central metrics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmed.server.report import summary_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _history(*, central: bool, epsilon: bool = False, rounds: int = 3) -> list[dict]:
    rows = []
    for r in range(1, rounds + 1):
        per_site = {}
        for i, site in enumerate(("hospital_north", "hospital_<south>")):
            m = {"accuracy": 0.6 + 0.05 * r, "balanced_accuracy": 0.55 + 0.05 * r + 0.01 * i,
                 "auc": 0.6 + 0.07 * r - 0.02 * i, "f1": 0.5, "sensitivity": 0.7, "specificity": 0.6,
                 "ece": 0.05, "loss": 0.7, "num-examples": 40 + 10 * i, "confusion_matrix": [20, 5, 4, 11 + i]}
            if epsilon:
                m["epsilon"] = 0.8 * r + i
            per_site[site] = m
        row = {"round": r, "seconds": 2.0, "sites_connected": 2, "sites_trained": list(per_site),
               "sites_rejected": {"hospital_x": "update has NaN"} if r == 2 else {},
               "sites_eval_failed": ["hospital_<south>"] if r == 3 else [],
               "train_loss": 1 / r, "per_site": per_site,
               "fed_auc": 0.6 + 0.07 * r, "fed_worst_auc": 0.58 + 0.07 * r,
               "fed_balanced_accuracy": 0.6, "fed_worst_balanced_accuracy": 0.55}
        if central:
            row.update({"central_val_auc": [0.7, 0.8, 0.75][r - 1], "central_val_balanced_accuracy": 0.7,
                        "central_test_auc": 0.74, "central_test_balanced_accuracy": 0.68,
                        "central_test_confusion_matrix": [[30, 6], [5, 19]]})
        rows.append(row)
    return rows


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1024, path


@pytest.mark.parametrize("central,epsilon", [(True, True), (False, False)])
def test_report(tmp_path: Path, central: bool, epsilon: bool) -> None:
    out = write_report(_history(central=central, epsilon=epsilon), out_dir=tmp_path, title="Demo <fed>",
                       classes=["benign", "malignant"], config={"federation": {"rounds": 3}, "name": "a&b"})
    assert out == tmp_path / "report.html"
    text = out.read_text()
    assert "hospital_north" in text and "hospital_&lt;south&gt;" in text and "<south>" not in text
    assert "Demo &lt;fed&gt;" in text and "a&amp;b" in text and "update has NaN" in text
    assert all(f"<td>{r}</td>" in text for r in (1, 2, 3))
    for name in ("curves.png", "sites.png", "confusion_matrix.png"):
        _assert_png(tmp_path / name)
        assert f'src="{name}"' in text
    assert (tmp_path / "epsilon.png").exists() == epsilon
    if central:
        assert "best round" in text and "2 (central_val_auc" in text
        assert "final test auc" in text


def test_sparse_histories(tmp_path: Path) -> None:
    one = [{"round": 1}]
    write_report(one, out_dir=tmp_path / "a", title="t", classes=[])
    _assert_png(tmp_path / "a" / "curves.png")
    single = _history(central=False, rounds=1)
    write_report(single, out_dir=tmp_path / "b", title="t", classes=["a", "b"])
    assert (tmp_path / "b" / "confusion_matrix.png").exists()
    write_report([], out_dir=tmp_path / "c", title="empty", classes=[])
    assert "rounds run" in (tmp_path / "c" / "report.html").read_text()


def test_summary_table() -> None:
    table = summary_table(_history(central=True))
    lines = table.splitlines()
    assert len(lines) == 5 and "val AUC" in lines[0] and "fed AUC" in lines[0]
    assert len({len(line) for line in lines}) == 1            # aligned
    assert "2/2" in lines[2]
    assert "val AUC" not in summary_table(_history(central=False))
    assert summary_table([]).startswith("round")


def _calibration(*, central: bool) -> dict:
    """A calibration result as the federation stores it, from real measure() of synthetic logits."""
    import numpy as np

    from fedmed.calibration import combine_measures, measure

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    z = rng.normal(0, 1, (300, 2))
    z[np.arange(300), y] += 1.0
    z *= 3.0  # over-confident
    sites = {"hospital_north": measure(z[:120], y[:120], temperature=2.0),
             "hospital_<south>": measure(z[120:], y[120:], temperature=2.0)}
    cal = {"method": "federated", "temperature": 2.0, "model": "best_model.pt", "round": 2,
           "fit": {"on": "sites' val splits", "sites": list(sites), "num-examples": 90,
                   "sites_failed": {"hospital_x": "no reply within the round timeout"}},
           "sites": sites, "sites_failed": {}, "pooled": combine_measures(sites)}
    if central:
        cal["central_test"] = measure(z[:200], y[:200], temperature=2.0)
    return cal


@pytest.mark.parametrize("central", [True, False])
def test_report_calibration_section(tmp_path: Path, central: bool) -> None:
    cal = _calibration(central=central)
    text = write_report(_history(central=central), out_dir=tmp_path, title="t", classes=["a", "b"],
                        calibration=cal).read_text()
    assert "<h2>Calibration</h2>" in text and "T = 2.000" in text and "federated, on the val splits of 2 sites" in text
    assert "all sites (pooled)" in text and "site hospital_&lt;south&gt;" in text
    assert f"<td>{cal['pooled']['ece_before']:.4f}</td><td>{cal['pooled']['ece_after']:.4f}</td>" in text
    assert "no reply within the round timeout" in text       # the site that missed the fit step
    assert ("central test set" in text) == central
    assert "calibration temperature" in text                 # summary row
    for name in ("reliability_before.png", "reliability_after.png"):
        _assert_png(tmp_path / name)
        assert f'src="{name}"' in text
    for name in ("reliability_central_before.png", "reliability_central_after.png"):
        assert (tmp_path / name).exists() == central and (f'src="{name}"' in text) == central


def test_report_calibration_missing_skipped_or_failed(tmp_path: Path) -> None:
    assert "Calibration" not in write_report(_history(central=True), out_dir=tmp_path / "a", title="t",
                                             classes=[]).read_text()
    skipped = {"method": "federated", "skipped": "multi-label model"}
    assert "Skipped: multi-label model" in write_report([], out_dir=tmp_path / "b", title="t", classes=[],
                                                        calibration=skipped).read_text()
    failed = {"method": "federated", "error": "no validation examples to fit a temperature on",
              "fit": {"sites": [], "sites_failed": {"hospital_y": "site failed: boom"}}}
    text = write_report([], out_dir=tmp_path / "c", title="t", classes=[], calibration=failed).read_text()
    assert "No temperature was fitted" in text and "site failed: boom" in text
    assert not (tmp_path / "c" / "reliability_before.png").exists()
    # summary.json's form (bins stripped): the table, no diagrams, no error
    from fedmed.server.calibration import calibration_summary

    text = write_report([], out_dir=tmp_path / "d", title="t", classes=[],
                        calibration=calibration_summary(_calibration(central=True))).read_text()
    assert "all sites (pooled)" in text and not (tmp_path / "d" / "reliability_before.png").exists()
