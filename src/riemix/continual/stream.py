"""A task stream: the tasks a continual run trains one after another, each with its train and test split.

A stream entry is a task folder, named relative to a data directory (``dbpedia`` under
``--data-dir cl_benchmark``) or given as a path::

    <task>/train.jsonl    classification JSONL: {"text": ..., "text_pair": optional, "label": class name}
    <task>/test.jsonl     the same, scored after every task
    <task>/labels.json    optional: {"labels": [class names, in order], "instruction": "...",
                          "label_words": [one word per class]}

How a causal LM answers (``presentation``): the prompt is the text, the instruction and the options, then
``Answer:``; each class is scored by the first token of its label word (``labels.json``'s
``label_words``, a ``--label-words task=w1,w2`` override, else the class name).  When two classes' words
start with the same token (``very negative`` / ``very positive``), the task is posed as a multiple-choice
question instead and scored by the option letters.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from riemix.data import DataError, Dataset, MCQExample, load_dataset
from riemix.tasks import TaskSpec, check_label_words

__all__ = [
    "SPLIT_FILES",
    "StreamTask",
    "label_word_overrides",
    "load_stream",
    "presentation",
    "stream_fingerprint",
]

#: The files of a task folder, by split.
SPLIT_FILES: dict[str, str] = {"train": "train.jsonl", "test": "test.jsonl"}
_LABELS_FILE = "labels.json"


@dataclass
class StreamTask:
    """One task of a stream.

    Attributes:
        name: the entry as given (folder name or path), used in tables and files.
        folder: the task folder.
        train: the training split.
        test: the evaluation split.
        instruction: the task's instruction (``labels.json``), or "".
        label_words: one word per class (empty: the class names).
    """

    name: str
    folder: Path
    train: Dataset
    test: Dataset
    instruction: str = ""
    label_words: list[str] = field(default_factory=list)


def label_word_overrides(entries: list[str]) -> dict[str, list[str]]:
    """Parse ``["amazon=terrible,bad,okay,good,great", ...]`` into ``{task: words}``.

    Raises:
        ValueError: an entry without ``=`` or without words, naming it.
    """
    out: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, words = str(entry).partition("=")
        parsed = [w.strip() for w in words.split(",") if w.strip()]
        if not sep or not name.strip() or not parsed:
            raise ValueError(f"label_words entry {entry!r} must look like 'task=word1,word2,...'")
        out[name.strip()] = parsed
    return out


def _task_folder(entry: str, position: int, data_dir: str | Path | None) -> Path:
    candidates = [Path(data_dir).expanduser() / entry] if data_dir else []
    candidates.append(Path(entry).expanduser())
    for folder in candidates:
        if folder.is_dir():
            missing = [f for f in SPLIT_FILES.values() if not (folder / f).is_file()]
            if missing:
                raise DataError(f"stream entry {entry!r} (task {position + 1}): {folder} has no {' or '.join(missing)}")
            return folder
    where = f" under data dir {data_dir}" if data_dir else ""
    known = ""
    if data_dir and Path(data_dir).expanduser().is_dir():
        names = sorted(p.name for p in Path(data_dir).expanduser().iterdir() if (p / SPLIT_FILES["train"]).is_file())
        known = f" (tasks there: {', '.join(names) or 'none'})"
    raise DataError(f"stream entry {entry!r} (task {position + 1}) does not exist: no task folder{where}{known}")


def _read_labels(folder: Path) -> dict:
    path = folder / _LABELS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("labels", []), list):
        raise DataError(f"{path}: expected an object with a 'labels' list")
    return data


def load_stream(
    entries: list[str],
    data_dir: str | Path | None = None,
    label_words: dict[str, list[str]] | None = None,
    eval_subset: int | None = None,
) -> list[StreamTask]:
    """Resolve and load every task of a stream.

    Args:
        entries: task folders, by name under ``data_dir`` or by path, in stream order.
        data_dir: where task names are looked up (a path entry works without it).
        label_words: ``{task: words}`` overriding a task's label words.
        eval_subset: score a fixed random subset (seed 0) of this many test examples per task.

    Raises:
        ValueError: an empty stream, a repeated entry, or label words given for a task not in the stream.
        riemix.data.DataError: an entry that does not exist, a folder without both splits, or a malformed
            file (naming file and line).
    """
    if not entries:
        raise ValueError("stream must name at least one task")
    repeated = sorted({e for e in entries if entries.count(e) > 1})
    if repeated:
        raise ValueError(f"stream names {repeated} more than once; each task appears once")
    overrides = dict(label_words or {})
    unknown = sorted(set(overrides) - set(entries))
    if unknown:
        raise ValueError(f"label_words names {unknown}, which are not in the stream {entries}")
    tasks = []
    for position, entry in enumerate(entries):
        folder = _task_folder(entry, position, data_dir)
        info = _read_labels(folder)
        names = [str(n) for n in info.get("labels", [])] or None
        train = load_dataset(str(folder / SPLIT_FILES["train"]), "train", task="classification", label_names=names)
        test = load_dataset(
            str(folder / SPLIT_FILES["test"]), "test", task="classification", label_names=train.label_names
        )
        if eval_subset and eval_subset < len(test):
            test = test.subset(eval_subset, seed=0)
        train, test = replace(train, name=entry), replace(test, name=entry)
        words = overrides.get(entry) or [str(w) for w in info.get("label_words", [])]
        if words and len(words) != len(train.label_names):
            raise ValueError(
                f"label words of task {entry!r}: {len(words)} given for {len(train.label_names)} classes "
                f"({', '.join(train.label_names)})"
            )
        tasks.append(StreamTask(entry, folder, train, test, str(info.get("instruction", "")), words))
    return tasks


def stream_fingerprint(tasks: list[StreamTask]) -> list[dict]:
    """What identifies a stream for a resume: each task's name, classes and a digest of its two files."""
    out = []
    for task in tasks:
        digest = hashlib.sha256()
        for split in SPLIT_FILES.values():
            digest.update((task.folder / split).read_bytes())
        out.append({"name": task.name, "labels": list(task.train.label_names), "sha256": digest.hexdigest()[:16]})
    return out


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _as_mcq(dataset: Dataset, suffix: str) -> Dataset:
    names = tuple(dataset.label_names)
    examples = [
        MCQExample(
            question=ex.text + (f"\n{ex.text_pair}" if ex.text_pair else "") + suffix,
            choices=names,
            answer=int(ex.label),
        )
        for ex in dataset.examples
    ]
    return replace(dataset, task="mcq", examples=examples, metric="accuracy")


def presentation(task: StreamTask, tokenizer, max_length: int) -> tuple[Dataset, Dataset, TaskSpec]:
    """The task's train and test sets as the model sees them, and their ``TaskSpec``.

    Label words (the class names unless given) whose first tokens differ: label-word classification with
    the prompt ``{text}\\n{instruction}\\nOptions: w1, w2, ...\\nAnswer:`` (left-truncated, so the text's
    start is cut, never the question).  Otherwise a letter-scored multiple-choice question.
    """
    words = task.label_words or list(task.train.label_names)
    question = f"\n{task.instruction}" if task.instruction else ""
    spec = TaskSpec(
        "causal_lm",
        "classification",
        template=_template(task, question, words),
        label_words=words,
        max_length=max_length,
    )
    try:
        check_label_words(spec, tokenizer)
    except ValueError:
        if task.label_words:  # words the user chose must work as given
            raise
        letter = TaskSpec("causal_lm", "mcq", format="letter", max_length=max_length)
        return _as_mcq(task.train, question), _as_mcq(task.test, question), letter
    return task.train, task.test, spec


def _template(task: StreamTask, question: str, words: list[str]) -> str:
    has_pair = any(ex.text_pair for ex in task.train.examples)
    return (
        "{text}" + ("\n{text_pair}" if has_pair else "") + _escape(question + f"\nOptions: {', '.join(words)}\nAnswer:")
    )
