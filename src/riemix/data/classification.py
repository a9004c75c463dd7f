"""Classification / regression readers for JSONL and TSV files.

The formats and the label rules are documented in :mod:`riemix.data.formats`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._io import as_str, finish, iter_jsonl, read_lines
from .records import ClassificationExample, DataError, Dataset

__all__ = ["TEXT_KEYS", "PAIR_KEYS", "LABEL_KEYS", "load_classification_jsonl", "load_classification_tsv"]

TEXT_KEYS: tuple[str, ...] = ("text", "sentence1", "question", "premise", "#1 String", "sentence")
PAIR_KEYS: tuple[str, ...] = ("text_pair", "sentence2", "hypothesis", "passage", "#2 String", "sentence")
LABEL_KEYS: tuple[str, ...] = ("label", "score", "Quality")
_INT_RE = re.compile(r"[+-]?\d+")


def _label_kind(raw: Any) -> str:
    if isinstance(raw, int):  # includes bool
        return "int"
    if isinstance(raw, float):
        return "float" if math.isfinite(raw) else "str"
    s = str(raw).strip()
    if _INT_RE.fullmatch(s):
        return "int"
    try:
        return "float" if math.isfinite(float(s)) else "str"
    except ValueError:
        return "str"


def _build_classification(
    path: Path,
    rows: list[tuple[int, str, str | None, Any]],
    label_names: Sequence[str] | None,
    task: str | None,
    name: str | None,
    split: str | None,
    metric: str | None,
) -> Dataset:
    """Convert raw ``(lineno, text, pair, raw_label)`` rows into a classification/regression set."""
    if task not in (None, "classification", "regression"):
        raise DataError(f"{path}: task {task!r} does not fit a text/label file")
    kinds = {_label_kind(r[3]) for r in rows}
    if task is None:
        numeric_only = "str" not in kinds and "float" in kinds
        task = "regression" if label_names is None and numeric_only else "classification"
    examples = []
    if task == "regression":
        for lineno, text, pair, raw in rows:
            if _label_kind(raw) == "str":
                raise DataError(f"{path}:{lineno}: label {raw!r} is not a number")
            examples.append(ClassificationExample(text, pair, float(raw)))
        return finish(path, "regression", examples, name, split_name=split, metric=metric or "")
    names = tuple(label_names) if label_names is not None else None
    if names is None and kinds == {"int"}:
        bad = next((r for r in rows if int(r[3]) < 0), None)
        if bad is not None:
            raise DataError(f"{path}:{bad[0]}: negative label {bad[3]!r}")
        names = tuple(str(i) for i in range(max(int(r[3]) for r in rows) + 1))
    elif names is None:
        names = tuple(sorted({_label_str(r[3]) for r in rows}))
    index = {n: i for i, n in enumerate(names)}
    for lineno, text, pair, raw in rows:
        key = _label_str(raw)
        if key in index:
            label = index[key]
        elif _label_kind(raw) == "int" and 0 <= int(raw) < len(names):
            label = int(raw)
        else:
            raise DataError(
                f"{path}:{lineno}: unknown label {raw!r} (valid: {', '.join(names)}"
                f" or indices 0..{len(names) - 1})"
            )
        examples.append(ClassificationExample(text, pair, label))
    return finish(
        path, "classification", examples, name, label_names=names, split_name=split, metric=metric or ""
    )


def _label_str(raw: Any) -> str:
    if isinstance(raw, bool):
        return str(int(raw))
    return str(raw).strip()


def _pick(keys: Sequence[str], available: Sequence[str], exclude: str | None = None) -> str | None:
    return next((k for k in keys if k in available and k != exclude), None)


def load_classification_jsonl(
    path: str | Path,
    *,
    label_names: Sequence[str] | None = None, task: str | None = None, name: str | None = None,
    split: str | None = None, metric: str | None = None,
    text_key: str | None = None, pair_key: str | None = None, label_key: str | None = None,
) -> Dataset:  # fmt: skip
    """Load a classification/regression JSONL file.

    Args:
        path: File to read.
        label_names: Class names; inferred from this file when ``None`` (see module docstring).
        task: ``"classification"``, ``"regression"`` or ``None`` to infer from the labels.
        name: Dataset name (default ``"<parent>/<stem>"``).
        split: Split name recorded as ``Dataset.split_name``.
        metric: Primary metric (default by task).
        text_key: Key of the text; detected from :data:`TEXT_KEYS` when ``None``.
        pair_key: Key of the second text (then required on every line). When ``text_key`` is
            ``None`` the second text is optional and looked up per line in :data:`PAIR_KEYS`.
        label_key: Key of the label; detected from :data:`LABEL_KEYS` when ``None``.

    Raises:
        DataError: Naming the file and line of the first invalid record.
    """
    rows: list[tuple[int, str, str | None, Any]] = []
    for lineno, obj in iter_jsonl(path):
        if not rows:
            keys = list(obj)
            auto_pair = text_key is None
            if text_key is None:
                text_key = _pick(TEXT_KEYS, keys)
            label_key = label_key or _pick(LABEL_KEYS, keys)
            if text_key is None:
                raise DataError(f'{path}:{lineno}: missing field "text" (looked for {", ".join(TEXT_KEYS)})')
            if label_key is None:
                raise DataError(
                    f'{path}:{lineno}: missing field "label" (looked for {", ".join(LABEL_KEYS)})'
                )
        try:
            for key in (text_key, label_key) + ((pair_key,) if pair_key else ()):
                if key not in obj:
                    raise ValueError(f'missing field "{key}"')
            text = as_str(obj[text_key], text_key).strip()
            this_pair = _pick(PAIR_KEYS, list(obj), exclude=text_key) if auto_pair else pair_key
            pair = obj[this_pair] if this_pair else None
            pair = None if pair is None else as_str(pair, this_pair).strip()
            raw = obj[label_key]
            if raw is None or isinstance(raw, (list, dict)):
                raise ValueError(f"label must be a number or a string, got {raw!r}")
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from e
        rows.append((lineno, text, pair, raw))
    return _build_classification(Path(path), rows, label_names, task, name, split, metric)


def load_classification_tsv(
    path: str | Path,
    *,
    label_names: Sequence[str] | None = None, task: str | None = None, name: str | None = None,
    split: str | None = None, metric: str | None = None,
    text_column: str | int | None = None, pair_column: str | int | None = None,
    label_column: str | int | None = None, has_header: bool = True,
) -> Dataset:  # fmt: skip
    """Load a tab-separated classification/regression file (no quoting; GLUE style).

    Args:
        path, label_names, task, name, split, metric: As in :func:`load_classification_jsonl`.
        text_column: Header name or 0-based index of the text column; detected when ``None``.
        pair_column: Name/index of the second text column; detected only when ``text_column``
            is ``None`` too.
        label_column: Name/index of the label column; detected when ``None``.
        has_header: Whether line 1 is a header; without one all columns must be indices.

    Raises:
        DataError: On a missing column, a short row or an invalid label, naming file and line.
    """
    lines = read_lines(path)
    if has_header:
        head_no, head = next(lines)
        header = head.split("\t")
        if text_column is None:
            text_column = _pick(TEXT_KEYS, header)
            pair_column = _pick(PAIR_KEYS, header, exclude=text_column)
        label_column = label_column if label_column is not None else _pick(LABEL_KEYS, header)
        cols = []
        for what, col, keys in (
            ("text", text_column, TEXT_KEYS),
            ("label", label_column, LABEL_KEYS),
            ("second text", pair_column, ()),
        ):
            if col is None and keys:
                raise DataError(
                    f"{path}:{head_no}: no {what} column in header {header} (looked for {', '.join(keys)})"
                )
            if isinstance(col, str) and col not in header:
                raise DataError(f"{path}:{head_no}: no column {col!r} in header {header}")
            cols.append(header.index(col) if isinstance(col, str) else col)
        t_idx, l_idx, p_idx = cols
    else:
        if not isinstance(text_column, int) or not isinstance(label_column, int):
            raise DataError(f"{path}: a file without header needs integer text_column and label_column")
        if pair_column is not None and not isinstance(pair_column, int):
            raise DataError(f"{path}: a file without header needs an integer pair_column")
        t_idx, l_idx, p_idx = text_column, label_column, pair_column
    need = max(i for i in (t_idx, l_idx, p_idx) if i is not None) + 1
    rows: list[tuple[int, str, str | None, Any]] = []
    for lineno, line in lines:
        fields = line.split("\t")
        if len(fields) < need:
            raise DataError(
                f"{path}:{lineno}: expected at least {need} tab-separated columns, got {len(fields)}"
            )
        pair = fields[p_idx].strip() if p_idx is not None else None
        rows.append((lineno, fields[t_idx].strip(), pair, fields[l_idx].strip()))
    if not rows:
        raise DataError(f"{path}: no examples (only a header)")
    return _build_classification(Path(path), rows, label_names, task, name, split, metric)
