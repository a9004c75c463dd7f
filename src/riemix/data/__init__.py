"""Raw data layer: typed records, generic file formats and built-in benchmark datasets.

Tokenisation and prompting live elsewhere; this package only loads and validates data.
"""

from .builtin import (
    BUILTIN_DATASETS,
    DATA_DIR_ENV,
    PACKAGED_DIR,
    canonical_name,
    load_dataset,
    normalize_split,
    parse_scienceqa_prompt,
)
from .formats import (
    infer_task,
    iter_jsonl,
    load_classification_jsonl,
    load_classification_tsv,
    load_file,
    load_mcq_jsonl,
    load_sft_jsonl,
    parse_mcq_record,
    parse_messages,
)
from .records import (
    DEFAULT_METRIC,
    TASKS,
    ClassificationExample,
    DataError,
    Dataset,
    Example,
    MCQExample,
    SFTExample,
    choice_letters,
)

__all__ = [
    "BUILTIN_DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_METRIC",
    "PACKAGED_DIR",
    "TASKS",
    "ClassificationExample",
    "DataError",
    "Dataset",
    "Example",
    "MCQExample",
    "SFTExample",
    "canonical_name",
    "choice_letters",
    "infer_task",
    "iter_jsonl",
    "load_classification_jsonl",
    "load_classification_tsv",
    "load_dataset",
    "load_file",
    "load_mcq_jsonl",
    "load_sft_jsonl",
    "normalize_split",
    "parse_mcq_record",
    "parse_messages",
    "parse_scienceqa_prompt",
]
