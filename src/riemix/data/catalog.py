"""Where the built-in datasets' files come from, and a check of a ``--data-dir`` folder (``riemix data``).

The layout (which file each split reads) is ``riemix.data.builtin.dataset_files``; this module adds, per
built-in dataset, the public repository a copy of those files can be taken from and their licence, and
``check_data_dir`` loads every dataset a folder holds and reports what is usable, missing or malformed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .builtin import BUILTIN_DATASETS, DATA_DIR_ENV, PACKAGED_DIR, dataset_files, load_dataset
from .records import DataError

__all__ = ["SOURCES", "DataSource", "DirCheck", "check_data_dir", "describe_layout"]


@dataclass(frozen=True)
class DataSource:
    """Where a built-in dataset's files can be found publicly.

    Attributes:
        title: The dataset and its paper.
        source: ``owner/repo @ commit : path`` of a public copy of the files, unchanged.
        licence: The original dataset's licence.
    """

    title: str
    source: str
    licence: str


_GLUE_REPO = "F0restL1n/BERT @ 0d0288be : glue_data/"
#: One entry per name of ``BUILTIN_DATASETS``.
SOURCES: dict[str, DataSource] = {
    "commonsense_qa": DataSource(
        "CommonsenseQA (Talmor et al., 2019)",
        "kojima-takeshi188/zero_shot_cot @ 5ef330fc : dataset/CommonsenseQA/{train,dev}_rand_split.jsonl",
        "as released by the authors",
    ),
    "openbookqa": DataSource(
        "OpenBookQA (Mihaylov et al., 2018), Main", "raybears/cot-transparency @ f6874394 : data/openbook_qa/",
        "Apache-2.0",
    ),  # fmt: skip
    "arc_easy": DataSource(
        "AI2 Reasoning Challenge, Easy (packaged)",
        "raybears/cot-transparency @ f6874394 : data/arc_easy/ARC-Easy-{Train,Dev}.jsonl",
        "CC BY-SA 4.0",
    ),
    "scienceqa": DataSource(
        "ScienceQA text subset, chat format (Lu et al., 2022)",
        "cohere-ai/notebooks @ 62cfb71b : notebooks/data/scienceQA_{train,eval}.jsonl",
        "CC BY-NC-SA 4.0 (non-commercial)",
    ),
    "boolq": DataSource(
        "BoolQ (Clark et al., 2019), validation", "THUDM/P-tuning @ f4225d4d : FewGLUE_32dev/BoolQ/val.jsonl",
        "CC BY-SA 3.0",
    ),  # fmt: skip
    "piqa": DataSource(
        "PIQA (Bisk et al., 2020), validation", "ybisk/ybisk.github.io @ 21edab43 : piqa/data/", "AFL-3.0"
    ),
    "glue/sst2": DataSource("GLUE SST-2 (a 4,000-row train subset is packaged)", f"{_GLUE_REPO}SST-2/", "see GLUE"),
    "glue/cola": DataSource("GLUE CoLA", f"{_GLUE_REPO}CoLA/", "see GLUE"),
    "glue/mrpc": DataSource("GLUE MRPC", f"{_GLUE_REPO}MRPC/", "Microsoft research licence"),
    "glue/stsb": DataSource("GLUE STS-B", f"{_GLUE_REPO}STS-B/", "CC BY-SA 4.0"),
    "glue/rte": DataSource("GLUE RTE", f"{_GLUE_REPO}RTE/", "see GLUE"),
    "glue/wnli": DataSource("GLUE WNLI", f"{_GLUE_REPO}WNLI/", "CC BY 4.0"),
    "glue/qnli": DataSource("GLUE QNLI (dev only)", f"{_GLUE_REPO}QNLI/", "CC BY-SA 4.0"),
}


def _split_files(name: str) -> dict[str, tuple[str, ...]]:
    """``{"train": files, "dev": files}`` of a built-in dataset (a split it lacks is left out)."""
    out = {}
    for split in ("train", "dev"):
        try:
            out[split] = dataset_files(name, split)
        except DataError:
            continue
    return out


def describe_layout() -> str:
    """The ``--data-dir`` layout: per dataset, the files of each split, the public source and licence."""
    lines = [
        f"A data folder (--data-dir or ${DATA_DIR_ENV}) holds the files below, at these paths relative to it.",
        f"glue/sst2 (4,000-row train subset) and arc_easy also ship inside riemix ({PACKAGED_DIR.name}/).",
        "",
    ]
    for name in BUILTIN_DATASETS:
        src = SOURCES[name]
        lines.append(f"{name}: {src.title}")
        for split, files in _split_files(name).items():
            lines.append(f"    {split:<5} {', '.join(files)}")
        lines.append(f"    public copy: github.com/{src.source}")
        lines.append(f"    licence: {src.licence}")
    return "\n".join(lines)


@dataclass
class DirCheck:
    """What ``check_data_dir`` found for one dataset.

    Attributes:
        name: The built-in dataset name.
        status: ``ok``, ``missing`` (a file of a split is absent) or ``malformed`` (a file fails to load).
        detail: Rows per split when ``ok``; the missing files or the loader's message otherwise.
    """

    name: str
    status: str
    detail: str


def check_data_dir(data_dir: str | Path) -> list[DirCheck]:
    """Load every built-in dataset from ``data_dir`` alone and report each.

    Args:
        data_dir: The folder to check.

    Returns:
        One ``DirCheck`` per built-in dataset.

    Raises:
        ValueError: ``data_dir`` is not a directory.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"--data-dir {data_dir}: not a directory")
    checks = []
    for name in BUILTIN_DATASETS:
        files = _split_files(name)
        missing = sorted({f for fs in files.values() for f in fs if not (root / f).is_file()})
        if missing:
            checks.append(DirCheck(name, "missing", ", ".join(missing)))
            continue
        try:
            rows = {split: len(load_dataset(name, split, root)) for split in files}
        except DataError as exc:
            checks.append(DirCheck(name, "malformed", str(exc)))
            continue
        checks.append(DirCheck(name, "ok", ", ".join(f"{split} {n:,} rows" for split, n in rows.items())))
    return checks
