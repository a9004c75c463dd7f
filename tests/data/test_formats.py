"""Generic data formats (riemix.data.formats): MCQ / classification / SFT files and errors naming file and line."""

import re

import pytest

from riemix.data import ClassificationExample, DataError, MCQExample, SFTExample, load_dataset, load_file
from tests.helpers import at_line, write_jsonl, write_lines


def test_mcq_jsonl_round_trip(tmp_path):
    path = write_jsonl(
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
    ds = load_file(write_jsonl(tmp_path / "c.jsonl", rows))
    assert ds.task == "classification" and ds.label_names == ("neg", "pos")  # sorted unique
    assert ds.examples == [ClassificationExample("good", None, 1), ClassificationExample("bad", "x", 0)]
    ds = load_file(tmp_path / "c.jsonl", label_names=("pos", "neg"))
    assert ds.targets().tolist() == [0, 1]
    ds = load_file(write_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": True}]))
    assert ds.label_names == ("0", "1", "2") and ds.targets().tolist() == [2, 1]
    ds = load_file(write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 2.5}]))
    assert ds.task == "regression" and ds.targets().tolist() == [1.0, 2.5]
    assert ds.metric == "pearson_spearman"


def test_classification_tsv(tmp_path):
    path = write_lines(tmp_path / "t.tsv", ["\ufeffsentence1\tsentence2\tlabel", 'a "q\tb\tyes', "c\td\tno", ""])
    ds = load_file(path)
    assert ds.label_names == ("no", "yes")
    assert ds.examples == [ClassificationExample('a "q', "b", 1), ClassificationExample("c", "d", 0)]
    ds = load_file(write_lines(tmp_path / "s.tsv", ["sentence\tlabel", "fine film \t1", "dull\t0"]))
    assert ds.examples[0] == ClassificationExample("fine film", None, 1) and ds.label_names == ("0", "1")
    ds = load_file(write_lines(tmp_path / "g.tsv", ["text\tscore", "a\t3.800", "b\t1"]))
    assert ds.task == "regression" and ds.targets().tolist() == [3.8, 1.0]


def test_sft_formats(tmp_path):
    path = write_jsonl(
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
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=at_line(path, line) + re.escape(message)):
        load_file(path, task="mcq")


def test_unknown_label_error(tmp_path):
    path = write_jsonl(tmp_path / "lab.jsonl", [{"text": "a", "label": "yes"}, {"text": "b", "label": "maybe"}])
    with pytest.raises(DataError, match=at_line(path, 2) + re.escape("unknown label 'maybe' (valid: no, yes")):
        load_file(path, label_names=("no", "yes"))
    path = write_jsonl(tmp_path / "idx.jsonl", [{"text": "a", "label": 5}])
    with pytest.raises(DataError, match=at_line(path, 1) + "unknown label 5"):
        load_file(path, label_names=("no", "yes"))
    path = write_jsonl(tmp_path / "reg.jsonl", [{"text": "a", "label": "x"}])
    with pytest.raises(DataError, match=at_line(path, 1) + "label 'x' is not a number"):
        load_file(path, task="regression")


def test_tsv_errors(tmp_path):
    path = write_lines(tmp_path / "short.tsv", ["sentence\tlabel", "ok\t1", "no label column"])
    with pytest.raises(DataError, match=at_line(path, 3) + "expected at least 2 tab-separated columns"):
        load_file(path)
    path = write_lines(tmp_path / "nolabel.tsv", ["index\tsentence", "0\tx"])
    with pytest.raises(DataError, match=at_line(path, 1) + "no label column"):
        load_file(path)
    path = write_lines(tmp_path / "head.tsv", ["sentence\tlabel"])
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
    path = write_lines(tmp_path / "data.csv", ["a,b"])
    with pytest.raises(DataError, match="unsupported file type"):
        load_file(path)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=at_line(path, 2) + "not valid UTF-8"):
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
    path = write_jsonl(tmp_path / "sft.jsonl", [{"text": "fine"}, record])
    with pytest.raises(DataError, match=at_line(path, 2) + re.escape(message)):
        load_file(path, task="sft")


def test_cannot_infer_task(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=at_line(path, 1) + "cannot infer the task"):
        load_file(path)
