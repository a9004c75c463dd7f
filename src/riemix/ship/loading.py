"""A base model with its trained adapter, from a run directory or an adapter directory: ``load_adapted``.

A *run directory* (written by ``riemix train``) holds ``config.yaml``, whose ``model`` field names the base
model, and ``adapter/``; an *adapter directory* (``riemix.save_adapter``) holds ``adapter_config.json`` and
the tensors, and needs the base model named.  ``riemix export`` and ``riemix generate`` load through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from riemix.hub.loading import load_model
from riemix.io.adapter import CONFIG_NAME, load_adapter

__all__ = ["DTYPES", "AdapterSource", "load_adapted", "resolve_adapter_source"]

#: Weight dtypes a model can be loaded in for export and generation.
DTYPES = ("float32", "float64", "bfloat16", "float16")


class AdapterSource(NamedTuple):
    """Where an adapter is.

    Attributes:
        adapter_dir: the adapter directory.
        model: the base model named by the run's ``config.yaml``; None for an adapter directory.
    """

    adapter_dir: Path
    model: str | None


def _read_run_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a mapping of run settings, got {type(saved).__name__}")
    return saved


def resolve_adapter_source(path: str | os.PathLike) -> AdapterSource:
    """Where the adapter of a run directory or an adapter directory is, and the run's base model.

    Args:
        path: a run directory (``config.yaml`` + ``adapter/``) or an adapter directory
            (``adapter_config.json``).

    Returns:
        ``AdapterSource(adapter_dir, model)``; ``model`` is the run's ``model`` field, None for an adapter
        directory.

    Raises:
        ValueError: a missing path, a directory that is neither, a run without ``adapter/``, a
            ``config.yaml`` that is not a mapping with a string ``model``, a run that did not train a causal LM.
    """
    where = Path(path)
    if not where.is_dir():
        raise ValueError(f"{where}: no such run or adapter directory")
    run_config = where / "config.yaml"
    if run_config.is_file():
        saved = _read_run_config(run_config)
        kind = saved.get("model_kind", "causal_lm")
        if kind != "causal_lm":
            raise ValueError(f"{where}: the run trained a {kind} model; export and generate need a causal_lm")
        model = saved.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f"{run_config}: 'model' must name the base model, got {model!r}")
        adapter_dir = where / "adapter"
        if not (adapter_dir / CONFIG_NAME).is_file():
            raise ValueError(
                f"{where}: the run directory has no saved adapter ({adapter_dir / CONFIG_NAME} is missing)"
            )
        return AdapterSource(adapter_dir, model)
    if (where / CONFIG_NAME).is_file():
        return AdapterSource(where, None)
    raise ValueError(
        f"{where}: neither a run directory (config.yaml and adapter/) nor an adapter directory ({CONFIG_NAME})"
    )


def load_adapted(
    model: str | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: str = "float32",
    quantization: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and, optionally, its riemix adapter (in eval mode).

    Args:
        model: Base model (built-in name, local directory or hub id); default: the run directory's
            ``model`` (required with an adapter directory or without any adapter).
        adapter: A run directory or an adapter directory (None: the base model alone).
        dtype: Weight dtype of the base model (the adapter stays fp32, fp64 over fp64 weights).
        quantization: Load the base quantized by bitsandbytes (``nf4``, ``fp4``, ``int8``, as a run trained
            on it); None: full precision (also for a run that trained on a quantized base).

    Returns:
        ``(model, tokenizer)``; the tokenizer is None when the model directory has none.

    Raises:
        ValueError: an unknown dtype or quantization, no base model named, or a bad ``adapter`` path
            (``resolve_adapter_source``).
        riemix.hub.ModelLoadError: a base model that cannot be loaded.
        riemix.AdapterError: an adapter that is corrupt or does not fit the base model.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    source = resolve_adapter_source(adapter) if adapter is not None else None
    name = model or (source.model if source is not None else None)
    if name is None:
        what = f"{adapter} is an adapter directory" if adapter is not None else "no adapter given"
        raise ValueError(f"{what}: name the base model (--model)")
    base, tokenizer = load_model(name, dtype=getattr(torch, dtype), quantization=quantization)
    if source is not None:
        load_adapter(base, source.adapter_dir)
    base.eval()
    return base, tokenizer
