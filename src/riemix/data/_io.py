"""Low-level readers shared by the data loaders (UTF-8 lines, JSONL objects)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .records import DataError, Dataset

__all__ = ["read_lines", "iter_jsonl", "as_str", "default_name", "finish"]


def default_name(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` for the non-blank lines of a UTF-8 text file.

    Args:
        path: File to read.

    Yields:
        1-based line number and the line without its trailing newline / carriage return.

    Raises:
        DataError: If the file is missing, not a regular file, not UTF-8, or has no non-blank line.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 ({e.reason})") from e
    found = False
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            found = True
            yield i, line
    if not found:
        raise DataError(f"{p}: no examples (file is empty or blank)")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each JSON object line of a JSONL file.

    Raises:
        DataError: On a missing/empty file, malformed JSON, or a line that is not an object.
    """
    for lineno, line in read_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def as_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {value!r}")
    return value


def finish(path: Path, task: str, examples: list, name: str | None, **kw: Any) -> Dataset:
    return Dataset(name=name or default_name(path), task=task, examples=examples, source=str(path), **kw)
