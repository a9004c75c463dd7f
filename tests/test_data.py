"""Raw data layer: built-in datasets, generic formats, error messages, subset/split."""

import functools
import importlib.resources
import json
import re
from pathlib import Path

import numpy as np
import pytest

from riemix.data import (
    BUILTIN_DATASETS,
    DATA_DIR_ENV,
    PACKAGED_DIR,
    ClassificationExample,
    DataError,
    Dataset,
    MCQExample,
    SFTExample,
    canonical_name,
    load_dataset,
    load_file,
    load_mixture,
    parse_scienceqa_prompt,
)
from riemix.metrics import compute_metrics

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


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def _write(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(path: Path, rows) -> Path:
    return _write(path, [r if isinstance(r, str) else json.dumps(r) for r in rows])


def _at(path: Path, line: int) -> str:
    return re.escape(f"{path}:{line}: ")


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


# ----------------------------------------------------------------------------- packaged copy
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


# ----------------------------------------------------------------------------- shared data
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


@needs_shared
def test_mixture():
    dss = load_mixture(["sst2", "arc_easy", "glue/cola"], "dev", SHARED)
    assert [d.name for d in dss] == ["glue/sst2", "arc_easy", "glue/cola"]
    assert [len(d) for d in load_mixture("sst2, arc_easy", "dev", SHARED)] == [872, 570]


# ----------------------------------------------------------------------------- builtin parsers
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
    _jsonl(
        tmp_path / "scienceqa/eval.jsonl",
        [
            {"messages": [{"role": "User", "content": turn}, {"role": "Chatbot", "content": "B"}]},
            {"messages": [{"role": "User", "content": turn}, {"role": "Chatbot", "content": "C"}]},
        ],
    )
    with pytest.raises(DataError, match=_at(tmp_path / "scienceqa/eval.jsonl", 2) + "answer 'C'"):
        load_dataset("scienceqa", "dev", tmp_path)
    (tmp_path / "piqa").mkdir()
    _jsonl(tmp_path / "piqa/valid.jsonl", [{"goal": f"g{i}", "sol1": "a", "sol2": "b"} for i in range(5)])
    _write(tmp_path / "piqa/valid-labels.lst", ["0", "1", "1", "0", "1"])
    train, dev = load_dataset("piqa", "train", tmp_path), load_dataset("piqa", "dev", tmp_path)
    assert (len(train), len(dev)) == (4, 1)
    assert {e.question for e in train} | {e.question for e in dev} == {f"g{i}" for i in range(5)}
    _write(tmp_path / "piqa/valid-labels.lst", ["0", "1", "2", "0", "1"])
    with pytest.raises(DataError, match=_at(tmp_path / "piqa/valid-labels.lst", 3) + "label '2'"):
        load_dataset("piqa", "dev", tmp_path)
    _write(tmp_path / "piqa/valid-labels.lst", ["0", "1"])
    with pytest.raises(DataError, match="2 labels for 5 examples"):
        load_dataset("piqa", "dev", tmp_path)


# ----------------------------------------------------------------------------- generic formats
def test_mcq_jsonl_round_trip(tmp_path):
    path = _jsonl(
        tmp_path / "mcq.jsonl",
        [
            {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1, "context": "math"},
            {"question": "Sky?", "choices": ["blue", "green"], "answer": "A"},
            {"question": "Sky?", "choices": ["blue", "green"], "answer": "b"},
            {"question": "Sky?", "choices": ["blue", "green"], "answer": "green"},
            "",
            {
                "question": {"stem": "ARC?", "choices": [{"label": "1", "text": "x"}, {"label": "2", "text": "y"}]},
                "answerKey": "2",
            },
            {
                "question_stem": "OBQA?",
                "choices": {"text": ["p", "q", "r"], "label": ["A", "B", "C"]},
                "answerKey": "C",
            },
        ],
    )
    ds = load_file(path)
    assert ds.task == "mcq" and ds.metric == "accuracy" and ds.source == str(path)
    assert ds[0] == MCQExample("2+2?", ("3", "4", "5"), 1, "math", ("A", "B", "C"))
    assert ds.targets().tolist() == [1, 0, 1, 1, 1, 2]
    assert ds[4] == MCQExample("ARC?", ("x", "y"), 1)
    assert ds[4].labels == ("A", "B")  # native "1","2" normalised to letters
    assert load_dataset(str(path), "dev").examples == ds.examples


def test_classification_jsonl_labels(tmp_path):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "text_pair": "x", "label": "neg"}]
    ds = load_file(_jsonl(tmp_path / "c.jsonl", rows))
    assert ds.task == "classification" and ds.label_names == ("neg", "pos")  # sorted unique
    assert ds.examples == [ClassificationExample("good", None, 1), ClassificationExample("bad", "x", 0)]
    ds = load_file(tmp_path / "c.jsonl", label_names=("pos", "neg"))
    assert ds.targets().tolist() == [0, 1]
    ds = load_file(_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": True}]))
    assert ds.label_names == ("0", "1", "2") and ds.targets().tolist() == [2, 1]
    ds = load_file(_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 2.5}]))
    assert ds.task == "regression" and ds.targets().tolist() == [1.0, 2.5]
    assert ds.metric == "pearson_spearman"


def test_classification_tsv(tmp_path):
    path = _write(tmp_path / "t.tsv", ["\ufeffsentence1\tsentence2\tlabel", 'a "q\tb\tyes', "c\td\tno", ""])
    ds = load_file(path)
    assert ds.label_names == ("no", "yes")
    assert ds.examples == [ClassificationExample('a "q', "b", 1), ClassificationExample("c", "d", 0)]
    ds = load_file(_write(tmp_path / "s.tsv", ["sentence\tlabel", "fine film \t1", "dull\t0"]))
    assert ds.examples[0] == ClassificationExample("fine film", None, 1) and ds.label_names == ("0", "1")
    ds = load_file(_write(tmp_path / "g.tsv", ["text\tscore", "a\t3.800", "b\t1"]))
    assert ds.task == "regression" and ds.targets().tolist() == [3.8, 1.0]


def test_sft_formats(tmp_path):
    path = _jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "Q: hi", "completion": " A: hello"},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "User", "content": "Hi"},
                    {"role": "Chatbot", "content": "Hey"},
                    {"role": "user", "content": "Name?"},
                    {"role": "bot", "content": "Bot."},
                ]
            },
            {"text": "just text"},
        ],
    )
    ds = load_file(path)
    assert ds.task == "sft" and ds.metric == "loss"
    assert ds[0] == SFTExample("Q: hi", " A: hello")
    assert ds[1] == SFTExample("System: Be brief.\nUser: Hi\nAssistant: Hey\nUser: Name?\nAssistant:", "Bot.")
    assert ds[2] == SFTExample("", "just text")
    assert load_file(path, task="sft").examples == ds.examples


# ----------------------------------------------------------------------------- error paths
@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        (
            ['{"question": "q", "choices": ["a", "b"], "answer": 0}', "", '{"question": "q", "choices": '],
            3,
            "malformed JSON",
        ),
        (
            ['{"question": "q", "choices": ["a", "b"], "answer": 0}', '{"question": "q", "answer": 0}'],
            2,
            'missing field "choices"',
        ),
        (['{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 7}'], 1, "answer 7 out of range for 4 choices"),
        (['{"question": "q", "choices": ["a", "b"], "answer": "Z"}'], 1, "answer 'Z' matches no choice"),
        (['{"question": "q", "choices": ["a"], "answer": 0}'], 1, "need at least 2 choices"),
        (['{"question": "q", "choices": ["a", "b"]}'], 1, 'missing field "answer"'),
        (['["not", "an", "object"]'], 1, "expected a JSON object"),
    ],
)
def test_mcq_errors_name_file_and_line(tmp_path, lines, line, message):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=_at(path, line) + re.escape(message)):
        load_file(path, task="mcq")


def test_unknown_label_error(tmp_path):
    path = _jsonl(tmp_path / "lab.jsonl", [{"text": "a", "label": "yes"}, {"text": "b", "label": "maybe"}])
    with pytest.raises(DataError, match=_at(path, 2) + re.escape("unknown label 'maybe' (valid: no, yes")):
        load_file(path, label_names=("no", "yes"))
    path = _jsonl(tmp_path / "idx.jsonl", [{"text": "a", "label": 5}])
    with pytest.raises(DataError, match=_at(path, 1) + "unknown label 5"):
        load_file(path, label_names=("no", "yes"))
    path = _jsonl(tmp_path / "reg.jsonl", [{"text": "a", "label": "x"}])
    with pytest.raises(DataError, match=_at(path, 1) + "label 'x' is not a number"):
        load_file(path, task="regression")


def test_tsv_errors(tmp_path):
    path = _write(tmp_path / "short.tsv", ["sentence\tlabel", "ok\t1", "no label column"])
    with pytest.raises(DataError, match=_at(path, 3) + "expected at least 2 tab-separated columns"):
        load_file(path)
    path = _write(tmp_path / "nolabel.tsv", ["index\tsentence", "0\tx"])
    with pytest.raises(DataError, match=_at(path, 1) + "no label column"):
        load_file(path)
    path = _write(tmp_path / "head.tsv", ["sentence\tlabel"])
    with pytest.raises(DataError, match=re.escape(f"{path}: no examples")):
        load_file(path)


@pytest.mark.parametrize(("content", "message"), [("", "no examples"), ("\n  \n\n", "no examples")])
def test_empty_file_errors(tmp_path, content, message):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        load_file(path, task="mcq")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'absent.jsonl'}: file not found")):
        load_file(tmp_path / "absent.jsonl", task="sft")
    path = _write(tmp_path / "data.csv", ["a,b"])
    with pytest.raises(DataError, match="unsupported file type"):
        load_file(path)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=_at(path, 2) + "not valid UTF-8"):
        load_file(path, task="sft")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages contain no assistant turn"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]: unknown role 'wizard'"),
        ({"prompt": "p"}, 'missing field "completion"'),
        ({"foo": 1}, "missing field"),
    ],
)
def test_sft_errors(tmp_path, record, message):
    path = _jsonl(tmp_path / "sft.jsonl", [{"text": "fine"}, record])
    with pytest.raises(DataError, match=_at(path, 2) + re.escape(message)):
        load_file(path, task="sft")


def test_cannot_infer_task(tmp_path):
    path = _jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=_at(path, 1) + "cannot infer the task"):
        load_file(path)


# ----------------------------------------------------------------------------- records, subset, split
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
