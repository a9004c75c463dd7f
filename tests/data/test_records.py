"""Records and datasets (riemix.data.records): validation, deterministic subset and split."""

import pytest

from riemix.data import ClassificationExample, Dataset, MCQExample, SFTExample


def _toy(n: int = 100) -> Dataset:
    return Dataset(
        "toy", "classification", [ClassificationExample(f"t{i}", None, i % 2) for i in range(n)], label_names=("a", "b")
    )


def test_subset_deterministic():
    ds = _toy()
    a, b, c = ds.subset(10, seed=0), ds.subset(10, seed=0), ds.subset(10, seed=1)
    assert len(a) == 10 and a.examples == b.examples and a.examples != c.examples
    idx = [int(e.text[1:]) for e in a]
    assert idx == sorted(idx)  # original order kept
    assert a.name == "toy" and a.label_names == ("a", "b")
    assert ds.subset(1000).examples == ds.examples and len(ds.subset(0)) == 0
    with pytest.raises(ValueError):
        ds.subset(-1)


def test_split_deterministic_and_disjoint():
    ds = _toy()
    first, second = ds.split(0.8, seed=0)
    assert (len(first), len(second)) == (80, 20)
    assert set(first.examples).isdisjoint(second.examples)
    assert set(first.examples) | set(second.examples) == set(ds.examples)
    again = ds.split(0.8, seed=0)
    assert again[0].examples == first.examples and again[1].examples == second.examples
    assert ds.split(0.8, seed=1)[1].examples != second.examples
    assert [len(p) for p in _toy(3).split(0.01)] == [1, 2]  # both parts non-empty
    with pytest.raises(ValueError):
        ds.split(1.0)
    with pytest.raises(ValueError):
        _toy(1).split(0.5)


def test_record_validation():
    ex = MCQExample("q", ["a", "b", "c"], 2)
    assert ex.choices == ("a", "b", "c") and ex.labels == ("A", "B", "C") and ex.context is None
    with pytest.raises(ValueError, match="out of range"):
        MCQExample("q", ("a", "b"), 2)
    with pytest.raises(ValueError):
        MCQExample("q", ("a", "b"), True)
    with pytest.raises(ValueError):
        SFTExample("p", "")
    with pytest.raises(ValueError, match="expected MCQExample"):
        Dataset("x", "mcq", [SFTExample("", "t")])
    with pytest.raises(ValueError, match="unknown task"):
        Dataset("x", "ranking", [])
    with pytest.raises(ValueError):
        Dataset("x", "sft", [SFTExample("", "t")]).targets()
