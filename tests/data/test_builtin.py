"""Built-in datasets (riemix.data.builtin): the packaged copy, names and splits, the shared data, parsers."""

import functools
import importlib.resources
import re
from pathlib import Path

import numpy as np
import pytest

from riemix.data import (
    BUILTIN_DATASETS,
    DATA_DIR_ENV,
    PACKAGED_DIR,
    DataError,
    Dataset,
    MCQExample,
    canonical_name,
    load_dataset,
    parse_scienceqa_prompt,
)
from riemix.metrics import compute_metrics
from tests.helpers import at_line, write_jsonl, write_lines

SHARED = Path("/work/shared/data")
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="shared data folder not available")

# (name, split, rows) from /work/shared/data/SOURCES.md; boolq/piqa are the 80/20 split.
SHARED_COUNTS = [
    ("commonsense_qa", "train", 9741),
    ("commonsense_qa", "dev", 1221),
    ("openbookqa", "train", 4957),
    ("openbookqa", "test", 500),
    ("arc_easy", "train", 2251),
    ("arc_easy", "validation", 570),
    ("scienceqa", "train", 6079),
    ("scienceqa", "dev", 2095),
    ("boolq", "train", 2616),
    ("boolq", "dev", 654),
    ("piqa", "train", 1470),
    ("piqa", "dev", 368),
    ("glue/sst2", "train", 67349),
    ("glue/sst2", "dev", 872),
    ("glue/cola", "train", 8551),
    ("glue/cola", "dev", 1043),
    ("glue/mrpc", "train", 3667),
    ("glue/mrpc", "dev", 408),
    ("glue/stsb", "train", 5749),
    ("glue/stsb", "dev", 1500),
    ("glue/rte", "train", 2490),
    ("glue/rte", "dev", 277),
    ("glue/wnli", "train", 635),
    ("glue/wnli", "dev", 71),
    ("glue/qnli", "dev", 5463),
]


@functools.cache
def _shared(name: str, split: str) -> Dataset:
    return load_dataset(name, split, SHARED)


def _check_valid(ds: Dataset) -> None:
    assert len(ds) > 0
    if ds.task == "mcq":
        for ex in ds:
            assert isinstance(ex, MCQExample) and 0 <= ex.answer < len(ex.choices)
            assert ex.labels == tuple("ABCDEFGH"[: len(ex.choices)])
    elif ds.task == "classification":
        assert set(ds.targets().tolist()) <= set(range(len(ds.label_names)))
    elif ds.task == "regression":
        assert np.isfinite(ds.targets()).all()
    if ds.task != "sft":  # the primary metric is computable on the dataset's own targets
        y = ds.targets()
        assert compute_metrics(ds.metric, y, y)[ds.metric] == pytest.approx(1.0)


def test_packaged_files_ship_with_the_package():
    root = importlib.resources.files("riemix.data") / "builtin"
    for rel in (
        "glue/SST-2/train.tsv",
        "glue/SST-2/dev.tsv",
        "arc_easy/train.jsonl",
        "arc_easy/dev.jsonl",
        "LICENSES.md",
    ):
        assert root.joinpath(rel).is_file(), rel
    assert Path(str(root)) == PACKAGED_DIR


@pytest.mark.parametrize(
    ("name", "split", "rows"),
    [
        ("glue/sst2", "train", 4000),
        ("SST-2", "validation", 872),
        ("glue/SST-2", "test", 872),
        ("arc_easy", "train", 2251),
        ("ARC-Easy", "dev", 570),
    ],
)
def test_packaged_loads_without_data_dir(name, split, rows):
    ds = load_dataset(name, split)
    assert len(ds) == rows
    assert Path(ds.source).is_relative_to(PACKAGED_DIR)
    _check_valid(ds)
    if ds.name == "glue/sst2":
        assert ds.task == "classification" and ds.label_names == ("negative", "positive")
        assert ds.metric == "accuracy" and ds[0].text_pair is None


def test_packaged_fallback_when_data_dir_lacks_file(tmp_path):
    ds = load_dataset("sst2", "dev", tmp_path)
    assert Path(ds.source).is_relative_to(PACKAGED_DIR)


def test_missing_dataset_error_lists_search_and_data_dir():
    with pytest.raises(DataError, match=r"boolq/val\.jsonl.*packaged copy.*--data-dir"):
        load_dataset("boolq", "dev")


def test_name_and_split_errors(tmp_path):
    with pytest.raises(DataError, match="no training split"):
        load_dataset("glue/qnli", "train")
    with pytest.raises(DataError, match="unknown dataset 'squad'"):
        load_dataset("squad", "train")
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        load_dataset("sst2", "holdout")
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_dataset("sst2", "train", missing)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "x.jsonl")) + ": file not found"):
        load_dataset(str(tmp_path / "x.jsonl"), "train")


def test_canonical_names():
    assert canonical_name("glue/SST-2") == canonical_name("sst2") == "glue/sst2"
    assert canonical_name("STS-B") == "glue/stsb" and canonical_name("csqa") == "commonsense_qa"
    assert canonical_name("CommonsenseQA") == "commonsense_qa" and canonical_name("foo") is None
    assert all(canonical_name(n) == n for n in BUILTIN_DATASETS)


@needs_shared
@pytest.mark.parametrize(("name", "split", "rows"), SHARED_COUNTS)
def test_shared_dataset_loads(name, split, rows):
    ds = _shared(name, split)
    assert len(ds) == rows
    assert ds.name == name and ds.split_name in ("train", "dev")
    assert Path(ds.source).is_relative_to(SHARED)
    _check_valid(ds)


@needs_shared
def test_shared_tasks_and_metrics(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED))  # env var is used when data_dir is None
    expect = {
        "glue/cola": ("classification", "matthews_corr"),
        "glue/mrpc": ("classification", "f1"),
        "glue/stsb": ("regression", "pearson_spearman"),
        "boolq": ("classification", "accuracy"),
        "piqa": ("mcq", "accuracy"),
        "scienceqa": ("mcq", "accuracy"),
    }
    for name, (task, metric) in expect.items():
        ds = load_dataset(name, "dev")
        assert (ds.task, ds.metric) == (task, metric)
        assert Path(ds.source).is_relative_to(SHARED)
    assert load_dataset("glue/rte", "dev").label_names == ("entailment", "not_entailment")
    arc = _shared("arc_easy", "train")  # native labels "1".."4" become letters
    assert {len(ex.choices) for ex in arc} == {3, 4, 5}


@needs_shared
@pytest.mark.parametrize(("name", "total"), [("boolq", 3270), ("piqa", 1838)])
def test_single_file_split_is_fixed_and_disjoint(name, total):
    train, dev = _shared(name, "train"), _shared(name, "dev")
    assert len(train) + len(dev) == total
    assert load_dataset(name, "train", SHARED).examples == train.examples
    key = (lambda e: (e.question, e.choices)) if name == "piqa" else (lambda e: (e.text, e.text_pair))
    assert not {key(e) for e in train} & {key(e) for e in dev} or name == "piqa"


@needs_shared
def test_packaged_sst2_is_the_documented_subset():
    full = _shared("glue/sst2", "train")
    assert load_dataset("glue/sst2", "train").examples == full.subset(4000, seed=0).examples
    assert (PACKAGED_DIR / "glue/SST-2/dev.tsv").read_bytes() == (SHARED / "glue/SST-2/dev.tsv").read_bytes()


def test_scienceqa_prompt_parsing():
    ctx, q, choices = parse_scienceqa_prompt(
        "Context: Some passage.\nQuestion: Which is hot?\nOptions:(A) ice (B) fire (C) snow\nAnswer:"
    )
    assert (ctx, q, choices) == ("Some passage.", "Which is hot?", ("ice", "fire", "snow"))
    assert parse_scienceqa_prompt("Context: \nQuestion: Q?\nOptions:(A) x (B) y\nAnswer:")[0] is None
    with pytest.raises(ValueError):
        parse_scienceqa_prompt("Question: no context")


def test_builtin_parsers_on_small_layout(tmp_path):
    (tmp_path / "scienceqa").mkdir()
    turn = "Context: c\nQuestion: q?\nOptions:(A) a (B) b\nAnswer:"
    write_jsonl(
        tmp_path / "scienceqa/eval.jsonl",
        [
            {"messages": [{"role": "User", "content": turn}, {"role": "Chatbot", "content": "B"}]},
            {"messages": [{"role": "User", "content": turn}, {"role": "Chatbot", "content": "C"}]},
        ],
    )
    with pytest.raises(DataError, match=at_line(tmp_path / "scienceqa/eval.jsonl", 2) + "answer 'C'"):
        load_dataset("scienceqa", "dev", tmp_path)
    (tmp_path / "piqa").mkdir()
    write_jsonl(tmp_path / "piqa/valid.jsonl", [{"goal": f"g{i}", "sol1": "a", "sol2": "b"} for i in range(5)])
    write_lines(tmp_path / "piqa/valid-labels.lst", ["0", "1", "1", "0", "1"])
    train, dev = load_dataset("piqa", "train", tmp_path), load_dataset("piqa", "dev", tmp_path)
    assert (len(train), len(dev)) == (4, 1)
    assert {e.question for e in train} | {e.question for e in dev} == {f"g{i}" for i in range(5)}
    write_lines(tmp_path / "piqa/valid-labels.lst", ["0", "1", "2", "0", "1"])
    with pytest.raises(DataError, match=at_line(tmp_path / "piqa/valid-labels.lst", 3) + "label '2'"):
        load_dataset("piqa", "dev", tmp_path)
    write_lines(tmp_path / "piqa/valid-labels.lst", ["0", "1"])
    with pytest.raises(DataError, match="2 labels for 5 examples"):
        load_dataset("piqa", "dev", tmp_path)
