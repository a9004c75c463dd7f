"""Task streams: resolving entries, their errors, label words, presentation and the fingerprint."""

import json

import pytest

from riemix.continual.stream import label_word_overrides, load_stream, presentation, stream_fingerprint
from riemix.data import DataError
from tests.helpers import tiny_tokenizer, write_jsonl


def make_task(root, name, labels, n_train=12, n_test=6, labels_json=True, instruction="Which one?"):
    """A task folder ``root/name`` whose texts are tiny-vocabulary words, one class per label."""
    folder = root / name
    folder.mkdir(parents=True)
    words = ["what", "is", "tasty", "the", "best", "pick", "today", "here"]
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [
            {"text": f"{words[i % 8]} {labels[i % len(labels)]} {words[(i * 3) % 8]}", "label": labels[i % len(labels)]}
            for i in range(n)
        ]
        write_jsonl(folder / f"{split}.jsonl", rows)
    if labels_json:
        (folder / "labels.json").write_text(json.dumps({"labels": labels, "instruction": instruction}))
    return folder


@pytest.fixture
def root(tmp_path):
    make_task(tmp_path, "fruit", ["apple", "pear"])
    make_task(tmp_path, "stone", ["rock", "sand", "clay"])
    return tmp_path


def test_names_under_the_data_dir_and_paths_resolve_in_order(root):
    tasks = load_stream(["stone", str(root / "fruit")], data_dir=root, eval_subset=4)
    assert [t.name for t in tasks] == ["stone", str(root / "fruit")]
    assert tasks[0].train.label_names == ("rock", "sand", "clay")
    assert len(tasks[0].train) == 12 and len(tasks[0].test) == 4
    assert tasks[0].instruction == "Which one?"


def test_a_stream_entry_that_does_not_exist_is_named_with_the_tasks_there(root):
    with pytest.raises(DataError, match=r"stream entry 'nope' \(task 2\) does not exist.*tasks there: fruit, stone"):
        load_stream(["fruit", "nope"], data_dir=root)


def test_a_folder_without_its_test_split_is_named(root):
    (root / "fruit" / "test.jsonl").unlink()
    with pytest.raises(DataError, match=r"stream entry 'fruit' \(task 1\): .*fruit has no test.jsonl"):
        load_stream(["fruit"], data_dir=root)


@pytest.mark.parametrize(
    ("entries", "words", "match"),
    [
        ([], None, "stream must name at least one task"),
        (["fruit", "fruit"], None, r"stream names \['fruit'\] more than once"),
        (["fruit"], {"stone": ["a", "b", "c"]}, r"label_words names \['stone'\], which are not in the stream"),
        (["fruit"], {"fruit": ["apple"]}, r"label words of task 'fruit': 1 given for 2 classes \(apple, pear\)"),
    ],
)
def test_bad_streams_are_refused(root, entries, words, match):
    with pytest.raises(ValueError, match=match):
        load_stream(entries, data_dir=root, label_words=words)


def test_label_word_overrides_parse_and_refuse_a_malformed_entry():
    assert label_word_overrides(["a=x, y", "b=z"]) == {"a": ["x", "y"], "b": ["z"]}
    with pytest.raises(ValueError, match=r"label_words entry 'a' must look like 'task=word1,word2,...'"):
        label_word_overrides(["a"])


def test_distinct_label_words_classify_and_colliding_ones_become_a_letter_question(root):
    tok = tiny_tokenizer()
    make_task(root, "unknown", ["Xylo", "Zed"])  # both start with the unknown token: scored by letters instead
    fruit, unknown = load_stream(["fruit", "unknown"], data_dir=root)
    train, _, spec = presentation(fruit, tok, 32)
    assert spec.task == "classification" and spec.label_words == ["apple", "pear"]
    assert spec.template == "{text}\nWhich one?\nOptions: apple, pear\nAnswer:"
    train, test, spec = presentation(unknown, tok, 32)
    assert spec.task == "mcq" and spec.format == "letter" and train.task == "mcq"
    assert train.examples[0].choices == ("Xylo", "Zed") and train.examples[1].answer == 1


def test_label_words_a_user_gave_must_work_as_given(root):
    (fruit,) = load_stream(["fruit"], data_dir=root, label_words={"fruit": ["Xylo", "Zed"]})
    with pytest.raises(ValueError, match="starts with the unknown token"):
        presentation(fruit, tiny_tokenizer(), 32)


def test_the_fingerprint_changes_with_a_task_file(root):
    before = stream_fingerprint(load_stream(["fruit"], data_dir=root))
    with open(root / "fruit" / "train.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "fig", "label": "apple"}) + "\n")
    after = stream_fingerprint(load_stream(["fruit"], data_dir=root))
    assert before[0]["name"] == after[0]["name"] and before[0]["sha256"] != after[0]["sha256"]
