"""Iris loader, split and metric, including malformed CSVs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tandem import Example
from tandem.tasks.errors import DataError
from tandem.tasks.iris import iris_metric, load_iris, split_iris

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "iris" / "iris.csv"


def test_sklearn_default_and_shared_csv_agree():
    rows = load_iris()
    assert len(rows) == 150
    if SHARED.exists():
        csv_rows = load_iris(SHARED)
        assert len(csv_rows) == 150
        assert Counter(r["species"] for r in csv_rows) == Counter(r["species"] for r in rows)


def test_split_is_stratified_disjoint_and_seeded():
    rows = load_iris()
    s = split_iris(rows, seed=1)
    assert [len(s[k]) for k in ("train", "dev", "test")] == [50, 50, 50]
    for part in s.values():
        counts = Counter(r["species"] for r in part)
        assert max(counts.values()) - min(counts.values()) <= 1
    ids = [tuple(sorted(r.items())) for part in s.values() for r in part]
    assert len(set(ids)) == len(ids) or len(set(ids)) >= 147  # Iris has a few duplicate rows
    assert split_iris(rows, seed=1)["dev"] == s["dev"]
    assert split_iris(rows, seed=2)["dev"] != s["dev"]


def _csv(tmp_path, text):
    p = tmp_path / "iris.csv"
    p.write_text(text)
    return p


def test_missing_column_names_the_file(tmp_path):
    p = _csv(tmp_path, "sepal_length,sepal_width,petal_length,species\n5,3,1,setosa\n")
    with pytest.raises(DataError, match=r"iris.csv: missing column\(s\) \['petal_width'\]"):
        load_iris(p)


def test_non_numeric_cell_names_the_line(tmp_path):
    p = _csv(tmp_path, "sepal_length,sepal_width,petal_length,petal_width,species\n5,3,1,0.2,setosa\n5,abc,1,0.2,setosa\n")
    with pytest.raises(DataError, match="line 3: sepal_width is 'abc'"):
        load_iris(p)


def test_unknown_species_and_empty_file(tmp_path):
    p = _csv(tmp_path, "sepal_length,sepal_width,petal_length,petal_width,species\n5,3,1,0.2,rose\n")
    with pytest.raises(DataError, match="unknown species"):
        load_iris(p)
    p = _csv(tmp_path, "sepal_length,sepal_width,petal_length,petal_width,species\n")
    with pytest.raises(DataError, match="no data rows"):
        load_iris(p)
    with pytest.raises(DataError, match="no such file"):
        load_iris(tmp_path / "nope.csv")


def test_metric_normalizes():
    ex = Example(species="virginica")
    assert iris_metric(ex, Example(species="Iris-Virginica."))
    assert iris_metric(ex, Example(species="virginica"))
    assert not iris_metric(ex, Example(species="setosa"))
