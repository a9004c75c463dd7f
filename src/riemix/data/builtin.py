"""Built-in benchmark datasets, loaded by name.

``load_dataset(name, split, data_dir)`` reads the files of a data folder laid out as below
(``riemix data`` prints the layout with the public source and licence of every file, and checks a
folder: ``riemix.data.catalog``).

Split mapping -- ``"train"`` is the training file; ``"dev"``, ``"validation"``, ``"val"``,
``"valid"``, ``"eval"`` and ``"test"`` all mean the labelled evaluation file:

==================  ==================================  =======================================
name                ``train``                           ``dev`` (= validation = test)
==================  ==================================  =======================================
commonsense_qa      commonsense_qa/train.jsonl (9,741)  commonsense_qa/dev.jsonl (1,221)
openbookqa          openbookqa/train.jsonl (4,957)      openbookqa/test.jsonl (500)
arc_easy            arc_easy/train.jsonl (2,251)        arc_easy/dev.jsonl (570)
scienceqa           scienceqa/train.jsonl (6,079)       scienceqa/eval.jsonl (2,095)
boolq               80% of boolq/val.jsonl (2,616)      other 20% of boolq/val.jsonl (654)
piqa                80% of piqa/valid.jsonl (1,470)     other 20% of piqa/valid.jsonl (368)
glue/sst2           glue/SST-2/train.tsv (67,349)       glue/SST-2/dev.tsv (872)
glue/cola           glue/CoLA/train.tsv (8,551)         glue/CoLA/dev.tsv (1,043)
glue/mrpc           glue/MRPC/train.tsv (3,667)         glue/MRPC/dev.tsv (408)
glue/stsb           glue/STS-B/train.tsv (5,749)        glue/STS-B/dev.tsv (1,500)
glue/rte            glue/RTE/train.tsv (2,490)          glue/RTE/dev.tsv (277)
glue/wnli           glue/WNLI/train.tsv (635)           glue/WNLI/dev.tsv (71)
glue/qnli           -- (DataError: no train file)       glue/QNLI/dev.tsv (5,463)
==================  ==================================  =======================================

GLUE ``test.tsv`` files carry no labels and are never read. BoolQ and PIQA ship only their
validation file, so ``train``/``dev`` are the fixed split ``Dataset.split(0.8, seed=0)`` of it
(disjoint, original order kept). Name aliases: case, ``-`` and ``_`` are ignored and ``glue/`` is
optional (``"glue/SST-2"``, ``"sst2"``, ``"STS-B"``, ``"ARC-Easy"``); also ``csqa``, ``obqa``.

Tasks: commonsense_qa, openbookqa, arc_easy, scienceqa and piqa are ``mcq`` (PIQA: question =
goal, choices = (sol1, sol2)); boolq is sentence-pair ``classification`` (question, passage;
labels ``("False", "True")``); GLUE tasks are classification with the Hugging Face label names,
STS-B is ``regression``. Primary metrics: CoLA ``matthews_corr``, MRPC ``f1``, STS-B
``pearson_spearman``, everything else ``accuracy``.

Where files are looked for, first match wins (all files a split needs must be in one folder):

1. the ``data_dir`` argument (an error if it is not a directory);
2. the folder named by the ``RIEMIX_DATA_DIR`` environment variable (same);
3. the copy packaged with riemix (``riemix/data/builtin/``): GLUE SST-2 ``train`` -- a
   **4,000-row subset** (``seed 0``) of train.tsv -- and full ``dev``, plus ARC-Easy train/dev.

If none has the files a :class:`~riemix.data.records.DataError` lists the folders searched and
asks for ``--data-dir``. A path to an existing ``.jsonl``/``.tsv`` file is also accepted as
``name`` and read with :func:`riemix.data.formats.load_file` (``split`` is then only recorded;
built-in names win over same-named files -- write ``./sst2`` to force the file).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from .formats import (
    iter_jsonl,
    load_classification_jsonl,
    load_classification_tsv,
    load_file,
    load_mcq_jsonl,
    read_lines,
)
from .records import DataError, Dataset, MCQExample

__all__ = [
    "BUILTIN_DATASETS",
    "DATA_DIR_ENV",
    "PACKAGED_DIR",
    "SPLIT_ALIASES",
    "canonical_name",
    "dataset_files",
    "normalize_split",
    "parse_scienceqa_prompt",
    "load_dataset",
]

DATA_DIR_ENV = "RIEMIX_DATA_DIR"
#: Folder of the data files shipped inside the package (SST-2 subset, ARC-Easy).
PACKAGED_DIR: Path = Path(__file__).resolve().parent / "builtin"

SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "dev": "dev",
    "validation": "dev",
    "val": "dev",
    "valid": "dev",
    "eval": "dev",
    "test": "dev",
}

#: Seed and train fraction of the fixed train/dev split of single-file datasets (BoolQ, PIQA).
SINGLE_FILE_SPLIT = (0.8, 0)

# GLUE: folder, text column, pair column, label column, label names (None: regression), metric.
_GLUE: dict[str, tuple[str, str | int, str | int | None, str | int, tuple[str, ...] | None, str]] = {
    "sst2": ("SST-2", "sentence", None, "label", ("negative", "positive"), "accuracy"),
    "cola": ("CoLA", 3, None, 1, ("unacceptable", "acceptable"), "matthews_corr"),
    "mrpc": ("MRPC", "#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent"), "f1"),
    "stsb": ("STS-B", "sentence1", "sentence2", "score", None, "pearson_spearman"),
    "rte": ("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), "accuracy"),
    "wnli": ("WNLI", "sentence1", "sentence2", "label", ("not_entailment", "entailment"), "accuracy"),
    "qnli": ("QNLI", "question", "sentence", "label", ("entailment", "not_entailment"), "accuracy"),
}
_MCQ_NATIVE = {"commonsense_qa": "dev.jsonl", "openbookqa": "test.jsonl", "arc_easy": "dev.jsonl"}

BUILTIN_DATASETS: tuple[str, ...] = (
    "commonsense_qa",
    "openbookqa",
    "arc_easy",
    "scienceqa",
    "boolq",
    "piqa",
    *(f"glue/{k}" for k in _GLUE),
)

_ALIASES = {n.replace("glue/", "").replace("_", ""): n for n in BUILTIN_DATASETS}
_ALIASES.update({"csqa": "commonsense_qa", "obqa": "openbookqa", "arce": "arc_easy"})


def canonical_name(name: str) -> str | None:
    """Return the canonical built-in name for ``name`` (``"SST-2"`` -> ``"glue/sst2"``), or ``None``."""
    key = name.strip().lower()
    if key.startswith("glue/"):
        key = key[5:]
    return _ALIASES.get(re.sub(r"[-_ ]", "", key))


def normalize_split(split: str) -> str:
    """Map a split name to ``"train"`` or ``"dev"`` (see :data:`SPLIT_ALIASES`).

    Raises:
        DataError: For an unknown split name.
    """
    canon = SPLIT_ALIASES.get(split.strip().lower())
    if canon is None:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLIT_ALIASES)}")
    return canon


def dataset_files(name: str, split: str) -> tuple[str, ...]:
    """Relative paths of the files that ``split`` (``train``/``dev``) of the built-in ``name`` needs.

    Raises:
        DataError: ``glue/qnli`` has no training split.
    """
    if name in _MCQ_NATIVE:
        return (f"{name}/{'train.jsonl' if split == 'train' else _MCQ_NATIVE[name]}",)
    if name == "scienceqa":
        return (f"scienceqa/{'train' if split == 'train' else 'eval'}.jsonl",)
    if name == "boolq":
        return ("boolq/val.jsonl",)
    if name == "piqa":
        return ("piqa/valid.jsonl", "piqa/valid-labels.lst")
    folder = _GLUE[name[5:]][0]
    if name == "glue/qnli" and split == "train":
        raise DataError(
            "glue/qnli has no training split (only glue/QNLI/dev.tsv is available); "
            "use split='dev' or train on another dataset"
        )
    return (f"glue/{folder}/{split}.tsv",)


def _roots(data_dir: str | Path | None) -> list[tuple[str, Path]]:
    roots: list[tuple[str, Path]] = []
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data directory {path} does not exist or is not a directory")
        roots.append(("data_dir argument", path))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"{DATA_DIR_ENV}={env} does not exist or is not a directory")
        roots.append((f"${DATA_DIR_ENV}", path))
    roots.append(("packaged copy", PACKAGED_DIR))
    return roots


def _locate(name: str, split: str, data_dir: str | Path | None) -> list[Path]:
    rel = dataset_files(name, split)
    roots = _roots(data_dir)
    for _, root in roots:
        paths = [root / r for r in rel]
        if all(p.is_file() for p in paths):
            return paths
    searched = [
        f"data_dir argument ({data_dir if data_dir is not None else 'not given'})",
        f"${DATA_DIR_ENV} ({os.environ.get(DATA_DIR_ENV) or 'not set'})",
        f"packaged copy ({PACKAGED_DIR})",
    ]
    raise DataError(
        f"dataset {name!r} split {split!r} needs {', '.join(rel)}, which was not found; searched: "
        f"{'; '.join(searched)}. "
        f"Pass --data-dir (or set {DATA_DIR_ENV}) pointing at a folder holding {', '.join(rel)}; "
        f"'riemix data' shows the layout and where public copies of the files are."
    )


def parse_scienceqa_prompt(text: str) -> tuple[str | None, str, tuple[str, ...]]:
    """Parse ``"Context: ...\\nQuestion: ...\\nOptions:(A) ... (B) ...\\nAnswer:"``.

    Returns:
        ``(context or None, question, choices)``.

    Raises:
        ValueError: If the text does not have that shape or the options are not ``(A) (B) ...``.
    """
    m = re.fullmatch(r"Context:(.*?)\nQuestion:(.*?)\nOptions:(.*?)\n?Answer:\s*", text, re.S)
    if m is None:
        raise ValueError("user turn does not match 'Context: ...\\nQuestion: ...\\nOptions: ...\\nAnswer:'")
    context, question, options = (g.strip() for g in m.groups())
    if not options.startswith("(A) "):
        raise ValueError(f"options do not start with '(A) ': {options[:40]!r}")
    choices, pos = [], 4
    for letter in "BCDEFGHIJKLMNOPQRSTUVWXYZ":
        j = options.find(f" ({letter}) ", pos)
        if j < 0:
            break
        choices.append(options[pos:j].strip())
        pos = j + 5
    choices.append(options[pos:].strip())
    return context or None, question, tuple(choices)


def _load_scienceqa(path: Path) -> list[MCQExample]:
    examples = []
    for lineno, obj in iter_jsonl(path):
        try:
            msgs = obj.get("messages")
            if not isinstance(msgs, list) or len(msgs) < 2:
                raise ValueError('missing field "messages" (need a user and an assistant turn)')
            user = next((m for m in msgs if str(m.get("role", "")).lower() in ("user", "human")), None)
            bot = [m for m in msgs if str(m.get("role", "")).lower() in ("chatbot", "assistant", "bot")]
            if user is None or not bot:
                raise ValueError("need a User turn and a Chatbot/assistant turn")
            context, question, choices = parse_scienceqa_prompt(str(user.get("content", "")))
            letter = str(bot[-1].get("content", "")).strip().strip("()")
            answer = ord(letter) - ord("A") if len(letter) == 1 else -1
            if not 0 <= answer < len(choices):
                raise ValueError(f"answer {letter!r} is not one of the {len(choices)} option letters")
            examples.append(MCQExample(question, choices, answer, context))
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from e
    return examples


def _load_piqa(paths: list[Path]) -> list[MCQExample]:
    data_path, label_path = paths
    labels = list(read_lines(label_path))
    records = list(iter_jsonl(data_path))
    if len(labels) != len(records):
        raise DataError(f"{label_path}: {len(labels)} labels for {len(records)} examples in {data_path}")
    examples = []
    for (lineno, obj), (lab_no, lab) in zip(records, labels, strict=True):
        if lab.strip() not in ("0", "1"):
            raise DataError(f"{label_path}:{lab_no}: label {lab.strip()!r} is not 0 or 1")
        try:
            for key in ("goal", "sol1", "sol2"):
                if not isinstance(obj.get(key), str):
                    raise ValueError(f'missing field "{key}"')
            examples.append(MCQExample(obj["goal"], (obj["sol1"], obj["sol2"]), int(lab)))
        except ValueError as e:
            raise DataError(f"{data_path}:{lineno}: {e}") from e
    return examples


def _load_builtin(name: str, split: str, paths: list[Path]) -> Dataset:
    if name in _MCQ_NATIVE:
        return load_mcq_jsonl(paths[0], name=name, split=split)
    if name == "scienceqa":
        return Dataset(name, "mcq", _load_scienceqa(paths[0]), source=str(paths[0]), split_name=split)
    if name in ("boolq", "piqa"):
        if name == "boolq":
            full = load_classification_jsonl(
                paths[0],
                name=name,
                task="classification",
                label_names=("False", "True"),
                text_key="question",
                pair_key="passage",
                label_key="label",
            )
        else:
            full = Dataset(name, "mcq", _load_piqa(paths), source=str(paths[0]))
        train, dev = full.split(*SINGLE_FILE_SPLIT)
        part = train if split == "train" else dev
        part.split_name = split
        return part
    folder, text, pair, label, label_names, metric = _GLUE[name[5:]]
    return load_classification_tsv(
        paths[0],
        name=name,
        split=split,
        metric=metric,
        label_names=label_names,
        task="classification" if label_names else "regression",
        text_column=text,
        pair_column=pair,
        label_column=label,
        has_header=not isinstance(text, int),
    )


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    *,
    task: str | None = None,
    label_names: Sequence[str] | None = None,
) -> Dataset:
    """Load a built-in dataset split, or a generic ``.jsonl``/``.tsv`` file.

    Args:
        name: A built-in name or alias (see the module docstring) or a path to an existing file.
        split: ``"train"``, or ``"dev"``/``"validation"``/``"test"`` (the labelled eval file).
            Ignored for file paths except that it is recorded on the dataset.
        data_dir: Data folder laid out as in the table above; see the search order above.
        task: Task of a generic file (inferred when ``None``); ignored for built-in names.
        label_names: Class names of a generic classification file; ignored for built-in names.

    Returns:
        The :class:`~riemix.data.records.Dataset`, with ``source`` set to the file read.

    Raises:
        DataError: Unknown name/split, missing files (listing the folders searched), QNLI
            ``train``, or any malformed record (naming file and line).
    """
    canon = canonical_name(name)
    if canon is None:
        path = Path(name).expanduser()
        if path.is_file():
            return load_file(path, task=task, label_names=label_names, split=split)
        if path.suffix.lower() in (".jsonl", ".json", ".tsv") or os.sep in name:
            raise DataError(f"{path}: file not found")
        raise DataError(
            f"unknown dataset {name!r}; built-in names: {', '.join(BUILTIN_DATASETS)} "
            "(or pass a path to a .jsonl/.tsv file)"
        )
    split = normalize_split(split)
    return _load_builtin(canon, split, _locate(canon, split, data_dir))

