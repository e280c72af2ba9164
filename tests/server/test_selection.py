"""The best round is chosen on validation data by train.monitor, never on a test split."""

from __future__ import annotations

from fedmed.server.federation import aggregate_site_metrics
from fedmed.server.report import _summary_rows
from fedmed.server.selection import best_round, selection


def _history(central: bool) -> list[dict]:
    rows = []
    # the sites' test AUC peaks in round 3, their val AUC in round 2, val bAcc in round 1
    for r, (test_auc, val_auc, val_bacc, val_loss) in enumerate(
            [(0.70, 0.75, 0.60, 0.9), (0.72, 0.80, 0.50, 0.8), (0.90, 0.70, 0.40, 0.7)], start=1):
        row = {"round": r, "fed_auc": test_auc, "fed_val_auc": val_auc, "fed_val_balanced_accuracy": val_bacc,
               "fed_val_loss": val_loss}
        if central:
            row.update(central_val_auc=[0.6, 0.65, 0.9][r - 1], central_test_auc=0.99)
        rows.append(row)
    return rows


def test_without_a_central_set_rounds_are_chosen_on_the_sites_val_splits():
    hist = _history(central=False)
    assert best_round(hist, "auc") == (2, "fed_val_auc", 0.80)  # not round 3, the best *test* AUC
    assert best_round(hist, "balanced_accuracy") == (1, "fed_val_balanced_accuracy", 0.60)
    assert best_round(hist, "loss") == (3, "fed_val_loss", 0.7)
    assert selection(hist[0], "auc") == ("fed_val_auc", 0.75)


def test_a_central_val_set_takes_precedence():
    hist = _history(central=True)
    assert best_round(hist, "auc") == (3, "central_val_auc", 0.9)


def test_the_report_names_the_round_the_server_kept():
    rows = dict(_summary_rows(_history(central=False), monitor="balanced_accuracy"))
    assert rows["best round"] == "1 (fed_val_balanced_accuracy = 0.6000)"


def test_sites_val_metrics_are_weighted_by_their_own_val_counts():
    per_site = {"a": {"auc": 0.9, "num-examples": 10, "val_auc": 0.6, "val_num-examples": 30},
                "b": {"auc": 0.5, "num-examples": 30, "val_auc": 1.0, "val_num-examples": 10}}
    out = aggregate_site_metrics(per_site)
    assert abs(out["fed_auc"] - 0.6) < 1e-12 and abs(out["fed_val_auc"] - 0.7) < 1e-12
    assert out["fed_worst_val_auc"] == 0.6 and out["fed_worst_auc"] == 0.5
