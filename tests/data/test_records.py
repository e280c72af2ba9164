"""fedmed.data.records: reading tables and the train-only RecordEncoder."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedmed.data.records import RecordEncoder, RecordError, normalise_value, read_table, to_numeric

NUMERIC = ["age", "bp"]
CATEGORICAL = {"sex": ["F", "M"], "stage": ["1", "2", "3"]}


def _frame(**cols) -> pd.DataFrame:
    return pd.DataFrame(cols)


TRAIN = _frame(age=["50", "60", "", "70"], bp=["120", "120", "120", "120"],
               sex=["F", "M", " M ", None], stage=["1", "2.0", "3", "4"])


def test_read_csv_keeps_ids_as_strings_and_numbers_lines(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text('patient_id,age,note\n007,50,"two\nlines"\n\n008,,plain\n')
    df = read_table(path)
    assert df["patient_id"].tolist() == ["007", "008"]
    assert pd.isna(df.loc[5, "age"]) and df.index.tolist() == [2, 5]  # real file lines


def test_read_parquet_and_errors(tmp_path):
    path = tmp_path / "records.parquet"
    pd.DataFrame({"patient_id": ["a", "b"], "age": [1.0, None]}).to_parquet(path)
    df = read_table(path)
    assert df.index.tolist() == [1, 2] and pd.isna(df["age"].iloc[1])
    with pytest.raises(RecordError, match="not found"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "r.xlsx").write_text("x")
    with pytest.raises(RecordError, match="unsupported"):
        read_table(tmp_path / "r.xlsx")


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), (float("nan"), None), ("", None), ("  ", None), (" M ", "M"),
     ("1", "1"), ("1.0", "1"), (1.0, "1"), (np.int64(3), "3"), (2.5, "2.5"), ("abc", "abc")],
)
def test_normalise_value(value, expected):
    assert normalise_value(value) == expected


def test_to_numeric_marks_bad_cells():
    col = pd.Series(["1.5", " 2 ", "", None, "abc", "inf"])
    out = to_numeric(col)
    assert out.iloc[:2].tolist() == [1.5, 2.0] and out.iloc[2:].isna().all()


def test_encoder_numeric_zscore_and_median_imputation():
    enc = RecordEncoder(numeric=NUMERIC, categorical=CATEGORICAL).fit(TRAIN)
    assert enc.mean == pytest.approx([60.0, 120.0])
    assert enc.std[0] == pytest.approx(np.std([50, 60, 70])) and enc.std[1] == 1.0  # std 0 → 1
    assert enc.median == [60.0, 120.0]
    out = enc.transform(TRAIN)
    assert out["num"].dtype == np.float32 and out["num"].shape == (4, 2)
    assert out["num_missing"].tolist() == [[False, False]] * 2 + [[True, False], [False, False]]
    assert out["num"][2, 0] == pytest.approx(0.0)  # imputed median 60 → z 0
    assert out["num"][0, 0] == pytest.approx(-10 / np.std([50, 60, 70]), rel=1e-5)


def test_encoder_categorical_indices_and_unknowns():
    enc = RecordEncoder(numeric=[], categorical=CATEGORICAL).fit(TRAIN)
    out = enc.transform(TRAIN)
    assert out["cat"].dtype == np.int64
    # sex F→1, M→2, " M "→2, None→0; stage "1"→1, "2.0"→2, "3"→3, "4" unknown→0
    assert out["cat"].tolist() == [[1, 1], [2, 2], [2, 3], [0, 0]]
    assert enc.unknown_counts(TRAIN) == {"sex": 0, "stage": 1}
    assert enc.cardinalities == [3, 4]
    assert out["num"].shape == (4, 0)


def test_all_missing_column_imputes_zero():
    df = _frame(age=[None, None], bp=["1", "3"], sex=["F", "F"], stage=["1", "1"])
    enc = RecordEncoder(numeric=NUMERIC, categorical=CATEGORICAL).fit(df)
    out = enc.transform(df)
    assert enc.median[0] == 0.0 and (out["num"][:, 0] == 0).all() and out["num_missing"][:, 0].all()
    assert not np.isnan(out["num"]).any()


def test_fit_uses_only_the_rows_it_is_given():
    test_rows = _frame(age=["1000"], bp=["10"], sex=["M"], stage=["1"])
    enc = RecordEncoder(numeric=NUMERIC, categorical=CATEGORICAL).fit(TRAIN)
    before = json.dumps(enc.state_dict())
    enc.transform(test_rows)
    changed = test_rows.assign(age=["-5000"])
    enc.transform(changed)
    assert json.dumps(enc.state_dict()) == before
    refit = RecordEncoder(numeric=NUMERIC, categorical=CATEGORICAL).fit(TRAIN)
    assert json.dumps(refit.state_dict()) == before


def test_knn_imputation_uses_neighbours():
    low, high = [str(20 + i) for i in range(6)], [str(80 + i) for i in range(6)]
    bp = [str(100 + i) for i in range(6)] + [str(200 + i) for i in range(6)]
    train = _frame(age=low + high, bp=bp, sex=["F"] * 12, stage=["1"] * 12)
    enc = RecordEncoder(numeric=NUMERIC, categorical=CATEGORICAL, imputation="knn").fit(train)
    query = _frame(age=[None, None], bp=["101", "201"], sex=["F", "F"], stage=["1", "1"])
    z = enc.transform(query)["num"][:, 0]
    ages = z * enc.std[0] + enc.mean[0]
    assert ages[0] < 30 and ages[1] > 75  # a median (~53) would put both in the middle


def test_state_dict_roundtrip_is_json():
    enc = RecordEncoder(numeric=NUMERIC, categorical=CATEGORICAL).fit(TRAIN)
    state = json.loads(json.dumps(enc.state_dict()))
    other = RecordEncoder(numeric=NUMERIC, categorical=CATEGORICAL)
    other.load_state_dict(state)
    for key, val in enc.transform(TRAIN).items():
        np.testing.assert_array_equal(val, other.transform(TRAIN)[key])
    with pytest.raises(RecordError, match="different"):
        RecordEncoder(numeric=["age"], categorical=CATEGORICAL).load_state_dict(state)


def test_knn_state_holds_rows_only_on_request():
    enc = RecordEncoder(numeric=NUMERIC, categorical=CATEGORICAL, imputation="knn").fit(TRAIN)
    assert "knn_rows" not in enc.state_dict()
    state = json.loads(json.dumps(enc.state_dict(include_rows=True)))
    other = RecordEncoder(numeric=NUMERIC, categorical=CATEGORICAL, imputation="knn")
    other.load_state_dict(state)
    np.testing.assert_allclose(other.transform(TRAIN)["num"], enc.transform(TRAIN)["num"])


def test_encoder_errors():
    with pytest.raises(RecordError, match="before fit"):
        RecordEncoder(numeric=NUMERIC, categorical={}).transform(TRAIN)
    with pytest.raises(RecordError, match=r"\['weight'\]"):
        RecordEncoder(numeric=["weight"], categorical={}).fit(TRAIN)
    with pytest.raises(RecordError, match="imputation"):
        RecordEncoder(numeric=[], categorical={}, imputation="mean")  # type: ignore[arg-type]
