"""The training data pipeline: datasets, encoded items, the seeded batch order and collation.

Every function is deterministic given its arguments: ``batch_at(items, i, ...)`` is the ``i``-th global
micro-batch of a seeded per-epoch permutation, so a resumed run (or a benchmark loop) sees exactly the
batches of a straight run without any iterator state.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch

from riemix.data import Dataset, load_dataset
from riemix.tasks import TaskSpec, collate_encoder, collate_lm, encode_train, pack_items
from riemix.training.config import TrainConfig

__all__ = ["batch_at", "collate", "encode_items", "epoch_order", "load_datasets", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_datasets(cfg: TrainConfig) -> tuple[list[Dataset], list[Dataset]]:
    """The training datasets and, one per training dataset, their evaluation datasets.

    ``cfg.train_subset`` draws a subset seeded with ``cfg.seed``; ``cfg.eval_subset`` one seeded with 0,
    so every run of a comparison is evaluated on the same examples.

    Raises:
        ValueError: when ``eval_dataset`` lists another number of datasets than ``dataset``.
    """
    names = cfg.dataset if isinstance(cfg.dataset, list) else [cfg.dataset]
    eval_names = cfg.eval_dataset or names
    eval_names = eval_names if isinstance(eval_names, list) else [eval_names]
    if len(eval_names) != len(names):
        raise ValueError(f"eval_dataset lists {len(eval_names)} datasets for {len(names)} training datasets")
    train_sets, eval_sets = [], []
    for name, eval_name in zip(names, eval_names, strict=True):
        tr = load_dataset(name, cfg.train_split, cfg.data_dir)
        ev = load_dataset(eval_name, cfg.eval_split, cfg.data_dir, label_names=tr.label_names)
        if cfg.train_subset:
            tr = tr.subset(cfg.train_subset, seed=cfg.seed)
        if cfg.eval_subset:
            ev = ev.subset(cfg.eval_subset, seed=0)
        train_sets.append(tr)
        eval_sets.append(ev)
    return train_sets, eval_sets


def encode_items(
    train_sets: list[Dataset], specs: list[TaskSpec], tokenizer, model_kind: str, pack_to: int | None = None
) -> list:
    """The training items of every dataset, in dataset order.

    Encoders get ``(dataset, example)`` pairs (tokenised at collation); causal LMs get ``LMItem``s, SFT
    sequences packed into rows of ``pack_to`` tokens when it is given (``TrainConfig.packing``).
    """
    items: list = []
    for ds, spec in zip(train_sets, specs, strict=True):
        if model_kind == "sequence_classification":
            items += [(ds, ex) for ex in ds.examples]
        elif ds.task == "sft" and pack_to:
            items += pack_items([encode_train(ex, spec, tokenizer) for ex in ds.examples], pack_to)
        else:
            items += [encode_train(ex, spec, tokenizer) for ex in ds.examples]
    return items


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The seeded permutation of ``n`` examples for one epoch (computed once per epoch, not per batch)."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist())


def batch_at(items: list, index: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list:
    """The items of global micro-batch ``index``: a seeded permutation per epoch, sharded by rank.

    Args:
        items: every training item (``encode_items``).
        index: the global micro-batch index (``step * grad_accum + micro``).
        batch_size: items per global micro-batch.
        seed: the run's seed (the permutation of epoch ``e`` is seeded with ``seed * 1000003 + e``).
        rank: this process's rank; it gets every ``world``-th item of the batch from ``rank`` on.
        world: the number of processes.
    """
    per_epoch = max(1, len(items) // batch_size)
    epoch, offset = divmod(index, per_epoch)
    chosen = epoch_order(len(items), seed, epoch)[offset * batch_size : (offset + 1) * batch_size]
    return [items[i] for i in chosen[rank::world]]


def collate(chunk: list, tokenizer, model_kind: str, max_length: int) -> dict[str, torch.Tensor]:
    """A model batch of ``chunk`` (items of ``encode_items``), on the CPU."""
    if model_kind == "sequence_classification":
        return collate_encoder([ex for _, ex in chunk], tokenizer, max_length, chunk[0][0].task == "regression")
    return collate_lm(chunk, tokenizer.pad_token_id)
