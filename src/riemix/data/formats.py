"""Readers for the generic, user-supplied data formats.

All files are read as UTF-8 (a leading byte-order mark is ignored); blank lines are skipped;
line numbers in error messages are 1-based physical line numbers. Every problem is reported as a
:class:`~riemix.data.records.DataError` whose message starts with ``"<path>:<line>: "``.

MCQ JSONL (``task="mcq"``), one object per line::

    {"question": "Which is a mammal?", "choices": ["trout", "whale", "frog"], "answer": 1,
     "context": "optional passage"}

``answer`` is a 0-based int index, a choice letter (``"B"``, case-insensitive), a native choice
label, or the exact text of a choice (checked in that order). The ARC / CommonsenseQA /
OpenBookQA shape ``{"question": {"stem": ..., "choices": [{"label", "text"}, ...]},
"answerKey": "B"}`` is accepted too, as is the Hugging Face shape ``{"question" or
"question_stem": ..., "choices": {"text": [...], "label": [...]}, "answerKey": ...}``. Native
labels (e.g. ARC's ``"1".."4"``) are only used to resolve the answer; examples always carry the
letters ``A, B, ...``.

Classification JSONL (``task="classification"`` or ``"regression"``)::

    {"text": "a gripping film", "text_pair": null, "label": "positive"}

Classification TSV: tab-separated, no quoting, first line a header naming a text column and a
label column. Column names are detected in this order -- text: ``text, sentence1, question,
premise, #1 String, sentence``; optional second text: ``text_pair, sentence2, hypothesis,
passage, #2 String, sentence``; label: ``label, score, Quality``. JSONL keys use the same names.
Leading/trailing whitespace of texts is stripped.

Labels: JSON ints/bools and integer strings (``"0"``, ``"1"``) are class indices; any other
strings are class names. With ``label_names`` given, a name is mapped to its position and an
index must be in ``range(len(label_names))``; anything else is an error. Without
``label_names`` they are inferred *from the file being read*: the sorted unique label strings if
any label is a name, else ``("0", ..., str(max_label))`` -- so pass the training set's
``label_names`` when reading its evaluation file. With ``task=None`` a file whose labels are all
numbers and include a non-integer (``"3.800"``) is read as regression (float labels).

SFT JSONL (``task="sft"``), one of::

    {"prompt": "Translate: chat", "completion": "cat"}
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"text": "plain language-model text"}

For ``messages`` the completion is the content of the last assistant turn and the prompt is every
earlier turn rendered as ``"<Role>: <content>"`` lines followed by ``"Assistant:"`` (turns after
the last assistant turn are dropped). Roles: ``system``; ``user``/``human``; ``assistant``/
``chatbot``/``bot``/``model``/``gpt`` (case-insensitive). Prompts and completions are kept
verbatim, so the tokenisation layer chooses the separator between them. ``text`` records get
``prompt=""``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._io import as_str, finish, iter_jsonl, read_lines
from .classification import (
    LABEL_KEYS,
    PAIR_KEYS,
    TEXT_KEYS,
    load_classification_jsonl,
    load_classification_tsv,
)
from .records import DataError, Dataset, MCQExample, SFTExample, choice_letters

__all__ = [
    "TEXT_KEYS",
    "PAIR_KEYS",
    "LABEL_KEYS",
    "read_lines",
    "iter_jsonl",
    "parse_mcq_record",
    "parse_messages",
    "infer_task",
    "load_mcq_jsonl",
    "load_classification_jsonl",
    "load_classification_tsv",
    "load_sft_jsonl",
    "load_file",
]


_ROLES = {
    "system": "System",
    "user": "User",
    "human": "User",
    "assistant": "Assistant",
    "chatbot": "Assistant",
    "bot": "Assistant",
    "model": "Assistant",
    "gpt": "Assistant",
}


def _parse_choices(raw: Any) -> tuple[list[str], list[str] | None]:
    if isinstance(raw, dict):
        texts = raw.get("text")
        if not isinstance(texts, list):
            raise ValueError('"choices" object must have a "text" list')
        labels = raw.get("label")
        return [as_str(t, "choice text") for t in texts], ([str(x) for x in labels] if labels else None)
    if not isinstance(raw, list):
        raise ValueError('"choices" must be a list of strings or of {"label", "text"} objects')
    if all(isinstance(c, dict) for c in raw) and raw:
        if any("text" not in c for c in raw):
            raise ValueError('every choice object needs a "text" field')
        texts = [as_str(c["text"], "choice text") for c in raw]
        labels = [str(c["label"]) for c in raw] if all("label" in c for c in raw) else None
        return texts, labels
    return [as_str(c, "choice") for c in raw], None


def _resolve_answer(raw: Any, texts: list[str], native: list[str] | None) -> int:
    n = len(texts)
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ValueError(f"answer must be an int index, a choice label or a choice text, got {raw!r}")
    if isinstance(raw, int):
        if not 0 <= raw < n:
            raise ValueError(f"answer {raw} out of range for {n} choices")
        return raw
    key = raw.strip()
    if native and key in native:
        return native.index(key)
    letters = choice_letters(n) if 1 <= n <= 26 else ()
    if key.upper() in letters and len(key) == 1:
        return letters.index(key.upper())
    if raw in texts:
        return texts.index(raw)
    if key in texts:
        return texts.index(key)
    valid = ", ".join(native or letters)
    raise ValueError(f"answer {raw!r} matches no choice label ({valid}) or choice text")


def parse_mcq_record(obj: dict[str, Any]) -> MCQExample:
    """Build an :class:`MCQExample` from one MCQ JSON object (see the module docstring).

    Raises:
        ValueError: Describing the first problem (missing field, bad answer, ...).
    """
    q = obj.get("question", obj.get("question_stem"))
    choices_raw = obj.get("choices")
    if isinstance(q, dict):
        if "stem" not in q:
            raise ValueError('missing field "question.stem"')
        if choices_raw is None:
            choices_raw = q.get("choices")
        q = q["stem"]
    if q is None:
        raise ValueError('missing field "question"')
    question = as_str(q, "question")
    if choices_raw is None:
        raise ValueError('missing field "choices"')
    texts, native = _parse_choices(choices_raw)
    if native is not None and len(set(native)) != len(native):
        raise ValueError(f"duplicate choice labels {native}")
    if len(texts) > 26:
        raise ValueError(f"at most 26 choices are supported, got {len(texts)}")
    if "answer" in obj:
        raw = obj["answer"]
    elif "answerKey" in obj:
        raw = obj["answerKey"]
    else:
        raise ValueError('missing field "answer"')
    if len(texts) < 2:
        raise ValueError(f"need at least 2 choices, got {len(texts)}")
    answer = _resolve_answer(raw, texts, native)
    context = obj.get("context")
    if context is not None:
        context = as_str(context, "context") or None
    return MCQExample(question=question, choices=tuple(texts), answer=answer, context=context)


def parse_messages(messages: Any) -> SFTExample:
    """Turn a chat ``messages`` list into a prompt/completion pair (see the module docstring).

    Raises:
        ValueError: On a malformed turn, an unknown role or no assistant turn.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'messages[{i}] must be an object with "role" and "content"')
        role = _ROLES.get(str(m["role"]).strip().lower())
        if role is None:
            raise ValueError(f"messages[{i}]: unknown role {m['role']!r} (valid: {', '.join(_ROLES)})")
        turns.append((role, as_str(m["content"], f"messages[{i}].content")))
    last = max((i for i, (r, _) in enumerate(turns) if r == "Assistant"), default=-1)
    if last < 0:
        raise ValueError("messages contain no assistant turn")
    lines = [f"{r}: {c}" for r, c in turns[:last]] + ["Assistant:"]
    return SFTExample(prompt="\n".join(lines), completion=turns[last][1])


def _parse_sft_record(obj: dict[str, Any]) -> SFTExample:
    if "messages" in obj:
        return parse_messages(obj["messages"])
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise ValueError(f'missing field "{key}"')
        return SFTExample(as_str(obj["prompt"], "prompt"), as_str(obj["completion"], "completion"))
    if "text" in obj:
        return SFTExample("", as_str(obj["text"], "text"))
    raise ValueError('missing field: expected "prompt"+"completion", "messages" or "text"')


def infer_task(obj: dict[str, Any]) -> str:
    """Guess the task of a JSONL file from its first object.

    Returns:
        ``"sft"``, ``"mcq"`` or ``"classification"`` (which may be refined to ``"regression"``
        once the labels are seen).

    Raises:
        ValueError: If no known field combination is present.
    """
    if "messages" in obj or "prompt" in obj or "completion" in obj:
        return "sft"
    if "choices" in obj or "question_stem" in obj or isinstance(obj.get("question"), dict):
        return "mcq"
    if any(k in obj for k in LABEL_KEYS):
        return "classification"
    if "text" in obj:
        return "sft"
    raise ValueError(f"cannot infer the task from fields {sorted(obj)}")


def _parse_lines(path: str | Path, parse: Callable[[dict[str, Any]], Any]) -> list:
    """``parse`` applied to every record of a JSONL file; a ``ValueError`` names the file and line."""
    examples = []
    for lineno, obj in iter_jsonl(path):
        try:
            examples.append(parse(obj))
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from e
    return examples


def load_mcq_jsonl(
    path: str | Path, *, name: str | None = None, split: str | None = None, metric: str = "accuracy"
) -> Dataset:
    """Load an MCQ JSONL file (see the module docstring).

    Raises:
        DataError: Naming the file and line of the first invalid record.
    """
    examples = _parse_lines(path, parse_mcq_record)
    return finish(Path(path), "mcq", examples, name, split_name=split, metric=metric)


def load_sft_jsonl(path: str | Path, *, name: str | None = None, split: str | None = None) -> Dataset:
    """Load an SFT JSONL file (``prompt``/``completion``, ``messages`` or ``text`` records).

    Raises:
        DataError: Naming the file and line of the first invalid record.
    """
    return finish(Path(path), "sft", _parse_lines(path, _parse_sft_record), name, split_name=split)


def load_file(
    path: str | Path,
    task: str | None = None,
    *,
    label_names: Sequence[str] | None = None,
    name: str | None = None,
    split: str | None = None,
) -> Dataset:
    """Load a ``.jsonl`` or ``.tsv`` file in one of the generic formats.

    Args:
        path: File to read.
        task: ``"mcq"``, ``"classification"``, ``"regression"``, ``"sft"`` or ``None`` to infer it
            from the first record's fields (TSV files are always classification/regression).
        label_names: Class names for classification files.
        name: Dataset name (default ``"<parent>/<stem>"``).
        split: Split name recorded as ``Dataset.split_name``.

    Raises:
        DataError: For unsupported suffixes, task mismatches and any record error.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".tsv":
        return load_classification_tsv(p, label_names=label_names, task=task, name=name, split=split)
    if suffix not in (".jsonl", ".json"):
        raise DataError(f"{p}: unsupported file type {suffix!r}; expected .jsonl or .tsv")
    if task is None:
        lineno, first = next(iter_jsonl(p))
        try:
            inferred = infer_task(first)
        except ValueError as e:
            raise DataError(f"{p}:{lineno}: {e}") from e
        if inferred != "classification":  # leave classification vs regression to the labels
            task = inferred
        else:
            return load_classification_jsonl(p, label_names=label_names, name=name, split=split)
    if task == "mcq":
        return load_mcq_jsonl(p, name=name, split=split)
    if task == "sft":
        return load_sft_jsonl(p, name=name, split=split)
    if task in ("classification", "regression"):
        return load_classification_jsonl(p, label_names=label_names, task=task, name=name, split=split)
    raise DataError(f"{p}: unknown task {task!r}")
