"""Typed records for the raw data layer.

Every loader in :mod:`riemix.data` returns a :class:`Dataset` holding a list of one of three
frozen example types:

* :class:`MCQExample` -- multiple choice; ``answer`` is a 0-based index into ``choices`` and
  ``labels`` are the choice letters (``"A"``, ``"B"``, ...). Native labels such as ARC's
  ``"1".."4"`` are normalised to letters by the loaders, so every MCQ prompt uses letters.
* :class:`ClassificationExample` -- single sentence or sentence pair with an ``int`` class index
  (``task="classification"``) or a ``float`` score (``task="regression"``).
* :class:`SFTExample` -- a prompt/completion pair (``prompt`` is ``""`` for plain text).

Records are plain data: no tokenisation, no prompt templates. Invalid records raise
``ValueError`` on construction; file loaders turn those into :class:`DataError` messages naming
the file and the 1-based line number.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal, Union

import numpy as np

__all__ = [
    "DataError",
    "MCQExample",
    "ClassificationExample",
    "SFTExample",
    "Example",
    "Task",
    "TASKS",
    "DEFAULT_METRIC",
    "Dataset",
    "choice_letters",
]

Task = Literal["mcq", "classification", "regression", "sft"]
TASKS: tuple[str, ...] = ("mcq", "classification", "regression", "sft")

#: Primary metric used when a :class:`Dataset` is built without an explicit ``metric``.
#: ``"loss"`` for SFT means "report the evaluation loss"; it is not a :mod:`riemix.metrics` name.
DEFAULT_METRIC: dict[str, str] = {
    "mcq": "accuracy",
    "classification": "accuracy",
    "regression": "pearson_spearman",
    "sft": "loss",
}


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent.

    Messages name the offending file and, where it applies, the 1-based line number, e.g.
    ``"train.jsonl:7: answer 7 out of range for 4 choices"``.
    """


def choice_letters(n: int) -> tuple[str, ...]:
    """Return the first ``n`` choice letters (``"A"``, ``"B"``, ...).

    Args:
        n: Number of choices, 1 to 26.

    Returns:
        Tuple of ``n`` upper-case letters.

    Raises:
        ValueError: If ``n`` is outside 1..26.
    """
    if not 1 <= n <= 26:
        raise ValueError(f"need between 1 and 26 choices, got {n}")
    return tuple(string.ascii_uppercase[:n])


@dataclass(frozen=True)
class MCQExample:
    """A multiple-choice question.

    Attributes:
        question: Question text (without the choices).
        choices: Answer options, in presentation order (at least 2).
        answer: 0-based index of the correct option.
        context: Optional supporting passage.
        labels: Choice letters, one per choice; filled with ``"A"``, ``"B"``, ... when empty.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    context: str | None = None
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.question, str):
            raise ValueError(f"question must be a string, got {type(self.question).__name__}")
        choices = tuple(self.choices)
        if len(choices) < 2:
            raise ValueError(f"need at least 2 choices, got {len(choices)}")
        for c in choices:
            if not isinstance(c, str):
                raise ValueError(f"choices must be strings, got {type(c).__name__}")
        object.__setattr__(self, "choices", choices)
        if isinstance(self.answer, bool) or not isinstance(self.answer, (int, np.integer)):
            raise ValueError(f"answer must be an int index, got {self.answer!r}")
        if not 0 <= int(self.answer) < len(choices):
            raise ValueError(f"answer {self.answer} out of range for {len(choices)} choices")
        object.__setattr__(self, "answer", int(self.answer))
        if self.context is not None and not isinstance(self.context, str):
            raise ValueError(f"context must be a string, got {type(self.context).__name__}")
        labels = tuple(self.labels) if self.labels else choice_letters(len(choices))
        if len(labels) != len(choices):
            raise ValueError(f"{len(labels)} labels for {len(choices)} choices")
        object.__setattr__(self, "labels", labels)


@dataclass(frozen=True)
class ClassificationExample:
    """A single-sentence or sentence-pair classification/regression example.

    Attributes:
        text: First (or only) text.
        text_pair: Second text for pair tasks, else ``None``.
        label: Class index (classification) or score (regression).
    """

    text: str
    text_pair: str | None
    label: int | float

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"text must be a string, got {type(self.text).__name__}")
        if self.text_pair is not None and not isinstance(self.text_pair, str):
            raise ValueError(f"text_pair must be a string, got {type(self.text_pair).__name__}")
        if isinstance(self.label, bool) or not isinstance(self.label, (int, float, np.number)):
            raise ValueError(f"label must be an int or float, got {self.label!r}")


@dataclass(frozen=True)
class SFTExample:
    """A supervised fine-tuning pair; the loss is taken on ``completion`` only.

    Attributes:
        prompt: Conditioning text, ``""`` for plain language-model text.
        completion: Target text (non-empty).
    """

    prompt: str
    completion: str

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.completion, str) or not self.completion:
            raise ValueError("completion must be a non-empty string")


Example = Union[MCQExample, ClassificationExample, SFTExample]  # noqa: UP007 (runtime alias, py3.10)

_EXAMPLE_TYPE = {
    "mcq": MCQExample,
    "classification": ClassificationExample,
    "regression": ClassificationExample,
    "sft": SFTExample,
}


@dataclass
class Dataset:
    """A named list of examples of one task type.

    Attributes:
        name: Dataset name (``"glue/sst2"``, ``"arc_easy"``, or a file stem).
        task: One of ``"mcq"``, ``"classification"``, ``"regression"``, ``"sft"``.
        examples: The examples; all of the type matching ``task``.
        label_names: Class names for classification (index ``i`` names label ``i``), else ``None``.
        metric: Primary metric name understood by :func:`riemix.metrics.compute_metrics`
            (``"accuracy"``, ``"f1"``, ``"matthews_corr"``, ``"pearson_spearman"``), or ``"loss"``
            for SFT. Defaults from :data:`DEFAULT_METRIC` when empty.
        source: Path of the file the examples were read from (``""`` if built in memory).
        split_name: Split the examples came from (``"train"``, ``"dev"``), if known.
    """

    name: str
    task: Task
    examples: list
    label_names: tuple[str, ...] | None = None
    metric: str = ""
    source: str = ""
    split_name: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        self.examples = list(self.examples)
        kind = _EXAMPLE_TYPE[self.task]
        for i, ex in enumerate(self.examples):
            if not isinstance(ex, kind):
                raise ValueError(
                    f"dataset {self.name!r}: example {i} is {type(ex).__name__}, "
                    f"expected {kind.__name__} for task {self.task!r}"
                )
        if self.label_names is not None:
            self.label_names = tuple(self.label_names)
        if not self.metric:
            self.metric = DEFAULT_METRIC[self.task]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    @property
    def num_labels(self) -> int | None:
        """Number of classes for classification datasets, else ``None``."""
        return len(self.label_names) if self.label_names is not None else None

    def targets(self) -> np.ndarray:
        """Gold targets as an array, ready for :mod:`riemix.metrics`.

        Returns:
            ``int64`` answer indices (mcq) or class indices (classification), ``float64`` scores
            (regression).

        Raises:
            ValueError: For SFT datasets, which have no scalar targets.
        """
        if self.task == "mcq":
            return np.array([ex.answer for ex in self.examples], dtype=np.int64)
        if self.task == "classification":
            return np.array([ex.label for ex in self.examples], dtype=np.int64)
        if self.task == "regression":
            return np.array([ex.label for ex in self.examples], dtype=np.float64)
        raise ValueError("SFT datasets have no scalar targets")

    def _with(self, indices: list[int]) -> Dataset:
        return replace(self, examples=[self.examples[i] for i in indices])

    def subset(self, n: int, seed: int = 0) -> Dataset:
        """Return a deterministic random subset of ``n`` examples, in original order.

        The chosen indices are ``sorted(random.Random(seed).sample(range(len(self)), n))``, which
        is stable across platforms and Python versions.

        Args:
            n: Number of examples to keep; ``n >= len(self)`` returns a copy of all examples.
            seed: Random seed.

        Returns:
            A new :class:`Dataset` with the same metadata.

        Raises:
            ValueError: If ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        if n >= len(self):
            return self._with(list(range(len(self))))
        return self._with(sorted(random.Random(seed).sample(range(len(self)), n)))

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Deterministically split into two disjoint parts, e.g. train and a held-out part.

        The first part receives ``round(fraction * len(self))`` examples (clamped so that both
        parts are non-empty when ``len(self) >= 2``), chosen by ``random.Random(seed).shuffle``;
        both parts keep the original example order. ``ds.split(0.9, seed=0)`` gives a 90/10
        train/held-out split.

        Args:
            fraction: Fraction of examples in the first part, strictly between 0 and 1.
            seed: Random seed.

        Returns:
            ``(first, second)`` datasets with the same metadata.

        Raises:
            ValueError: If ``fraction`` is not in (0, 1) or the dataset has fewer than 2 examples.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        n = len(self)
        if n < 2:
            raise ValueError(f"cannot split a dataset of {n} example(s)")
        k = min(max(round(fraction * n), 1), n - 1)
        order = list(range(n))
        random.Random(seed).shuffle(order)
        return self._with(sorted(order[:k])), self._with(sorted(order[k:]))
