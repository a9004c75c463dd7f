"""Training: a configuration, a data pipeline, a recipe and its logs.

Modules:
    config: :class:`TrainConfig`, every option of a run (validated, YAML round trip).
    data: datasets, encoded items, the seeded batch order (:func:`batch_at`) and collation.
    recipe: :func:`train` = :func:`setup`, then :func:`train_step` / :func:`evaluate` / :func:`save` in one loop.
    logging: ``metrics.jsonl`` + TensorBoard (:class:`MetricsLogger`) and the before/after table.
"""

from riemix.training.config import TrainConfig
from riemix.training.data import batch_at, collate, encode_items, load_datasets, seed_everything
from riemix.training.recipe import train

__all__ = ["TrainConfig", "batch_at", "collate", "encode_items", "load_datasets", "seed_everything", "train"]
