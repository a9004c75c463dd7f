"""Saving and loading MoE-LoRA adapters.

An adapter directory holds two files, each written atomically:

- ``adapter_model.safetensors``: the adapter tensors of every adapted module, keyed ``<module>.<suffix>``
  with the suffixes and shapes of the one table ``riemix.core.state.ADAPTER_TENSORS``: ``lora_A``,
  ``lora_B``, ``router.weight`` (``global_gate`` with ``routing="global"``), plus ``expert_scale`` with
  ``expert_scales`` and ``pissa_down`` / ``pissa_up`` with ``init="pissa"`` (the part of the base weight
  moved into the experts, so the residual base can be rebuilt from the original model), and the bool
  ``(E,)`` masks ``frozen_experts`` / ``frozen_router_rows`` of the layers with frozen experts
  (``riemix.core.freezing``; absent otherwise, and an adapter without them loads all-unfrozen);
- ``adapter_config.json``: format name and version, the full ``MoELoRAConfig``, a fingerprint of the base
  model (class name and, per wrapped module, its in/out features, expert count and rank: the dimensions
  the table's shapes are computed from, the rank being the stacked one R; a module whose experts have
  different ranks also records them, ``expert_ranks``, one per expert, and a module of uniform rank is
  written exactly as before they could differ; and the SHA-256 of the original weight it wraps, so an adapter is
  not silently loaded onto another checkpoint of the same architecture: ``riemix.io.fingerprint``) and
  the SHA-256 of the tensor file.

The directory is built in a hidden sibling and published whole (``riemix.io.fileio.publish_dir``: fsync,
then an atomic exchange with the previous adapter), so a crash at any instant leaves the previous
complete adapter or the new one, never a mix.  Non-finite tensors are refused: a diverged model never
replaces a good adapter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from riemix.core.config import MoELoRAConfig
from riemix.core.freezing import frozen_state_dict, load_frozen_state, split_frozen_state
from riemix.core.init import restore_pissa
from riemix.core.layer import is_conv1d, is_linear_like
from riemix.core.state import BUFFER_SUFFIXES, adapter_state_dict, adapter_tensor_shapes
from riemix.core.tuner import add_moe_lora, find_target_modules, iter_moe_lora_layers, layer_index
from riemix.io.fileio import (
    atomic_write,
    atomic_write_json,
    clean_stale_temp_dirs,
    file_sha256,
    publish_dir,
    recover_dir,
    sibling_temp_path,
)
from riemix.io.fingerprint import check_base_weights, layer_weight_digest

__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "AdapterError", "FORMAT_VERSION"]

FORMAT_NAME = "riemix-moe-lora"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter directory is missing, corrupt, or does not fit the base model."""



def _fingerprint(model: nn.Module) -> dict[str, Any]:
    modules = {}
    for name, layer in iter_moe_lora_layers(model):
        digest, dtype = layer_weight_digest(layer)  # the original base weight (riemix.io.fingerprint)
        modules[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "num_experts": layer.num_experts,
            "rank": layer.rank,
            **({"weight_sha256": digest, "weight_dtype": dtype} if digest is not None else {}),
        }
        if layer.rank_scale is not None:  # mixed ranks (riemix.core.dynamic); rank is their maximum R
            modules[name]["expert_ranks"] = list(layer.expert_ranks)
    return {"model_class": type(model).__name__, "modules": modules}


def _runtime_state(model: nn.Module) -> dict[str, float]:
    """Schedule values in force when saving (scale warm-up factor, router temperature)."""
    layer = next(layer for _, layer in iter_moe_lora_layers(model))
    return {"scale_factor": float(layer.scale_factor), "router_temperature": float(layer.router_temperature)}


def save_adapter(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the model's MoE-LoRA adapters to the directory ``path`` (created if needed).

    Args:
        model: a model prepared with ``add_moe_lora`` (or ``load_adapter``).
        path: output directory.
        extra: optional JSON-serialisable metadata stored under ``"extra"`` in the config.

    Returns:
        The directory path.

    Raises:
        ValueError: if the model carries no MoE-LoRA adapters or non-finite tensors, or ``path`` is a file
            or a directory holding other files than an adapter's (it is replaced whole).
    """
    config = getattr(model, "moe_lora_config", None)
    fingerprint = _fingerprint(model)
    if config is None or not fingerprint["modules"]:
        raise ValueError("model has no MoE-LoRA adapters to save; call add_moe_lora first")
    out = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    tensors.update(frozen_state_dict(model))  # only layers with frozen experts: (E,) bool masks
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a diverged model must not replace a good adapter
        raise ValueError(f"refusing to save the adapter to {out}: non-finite values (NaN or inf) in {bad[:3]}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot save the adapter to {out}: it is a file, not a directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME)) if out.is_dir() else []
    if foreign:  # the directory is replaced whole: never take a user's other files with it
        raise ValueError(
            f"refusing to save the adapter to {out}: it holds files that are not an adapter's: {foreign[:5]}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(out)  # what a save killed before publishing left behind
    tmp = sibling_temp_path(out)  # the whole directory is built aside and published in one rename
    tmp.mkdir()
    try:
        weights = atomic_write(tmp / WEIGHTS_NAME, lambda t: save_file(tensors, t, metadata={"format": "pt"}))
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "base_model": fingerprint,
            "weights_sha256": file_sha256(weights),
            "extra": extra or {},
            "runtime": _runtime_state(model),
        }
        atomic_write_json(tmp / CONFIG_NAME, meta)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``adapter_config.json`` of an adapter directory.

    Besides the format name and version, the structure ``load_adapter`` relies on is checked: ``config``
    is a mapping, ``weights_sha256`` a string, ``base_model`` a mapping with a string ``model_class`` and
    a ``modules`` mapping whose entries hold integer ``in_features``, ``out_features``, ``num_experts``
    and ``rank``, and ``runtime``, when present, a mapping.

    Args:
        path: the adapter directory.

    Returns:
        The parsed config.

    Raises:
        AdapterError: missing directory/file, invalid JSON, a top level that is not a JSON object, an
            unsupported format version, or a required key that is missing or of the wrong type (named).
    """
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: adapter config not found (is {path!s} an adapter directory?)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{cfg_path}: corrupt adapter config: {exc}") from exc
    if not isinstance(meta, dict):
        raise AdapterError(f"{cfg_path}: not a riemix adapter (expected a JSON object, got {type(meta).__name__})")
    if meta.get("format") != FORMAT_NAME:
        raise AdapterError(f"{cfg_path}: not a riemix adapter (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{cfg_path}: format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )

    def require(container: dict[str, Any], key: str, kind: type, where: str) -> Any:
        if key not in container:
            raise AdapterError(f"{cfg_path}: required key {where}{key} is missing")
        value = container[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = {dict: "a JSON object", str: "a string", int: "an integer"}[kind]
            raise AdapterError(f"{cfg_path}: {where}{key} must be {expected}, got {type(value).__name__}")
        return value

    require(meta, "config", dict, "")
    require(meta, "weights_sha256", str, "")
    base = require(meta, "base_model", dict, "")
    require(base, "model_class", str, "base_model.")
    modules = require(base, "modules", dict, "base_model.")
    if not modules:
        raise AdapterError(f"{cfg_path}: base_model.modules is empty (the adapter adapts no module)")
    for name in modules:
        info = require(modules, name, dict, "base_model.modules.")
        for field in ("in_features", "out_features", "num_experts", "rank"):
            require(info, field, int, f"base_model.modules.{name}.")
        _check_expert_ranks(info, f"{cfg_path}: base_model.modules.{name}.expert_ranks")
    if meta.get("runtime") is not None:
        require(meta, "runtime", dict, "")
    return meta


def _check_expert_ranks(info: dict[str, Any], where: str) -> None:
    """A module's optional ``expert_ranks``: ``num_experts`` ints >= 1 whose maximum is its ``rank``."""
    ranks = info.get("expert_ranks")
    if ranks is None:
        return
    ok = isinstance(ranks, list) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)
    if not ok or len(ranks) != info["num_experts"] or max(ranks) != info["rank"]:
        raise AdapterError(
            f"{where} must list num_experts={info['num_experts']} ints >= 1 whose maximum is rank={info['rank']}, "
            f"got {ranks!r}"
        )


def _module_ranks(info: dict[str, Any]) -> int | list[int]:
    """A module's saved expert ranks: its list for mixed ranks, else its one rank."""
    return info.get("expert_ranks") or info["rank"]


def _config_from_meta(meta: dict[str, Any]) -> MoELoRAConfig:
    data = dict(meta["config"])
    if data.get("rank") is None:  # saved from a callable: rebuild a per-layer list (the rank layers start with)
        ranks: dict[int, int] = {}
        for name, info in meta["base_model"]["modules"].items():
            ranks[layer_index(name) or 0] = (info.get("expert_ranks") or [info["rank"]])[0]
        data["rank"] = [ranks.get(i, max(ranks.values())) for i in range(max(ranks) + 1)]
    if data.get("num_experts") is None:  # saved from a callable: rebuild a per-layer list
        by_layer: dict[int, int] = {}
        for name, info in meta["base_model"]["modules"].items():
            by_layer[layer_index(name) or 0] = info["num_experts"]
        top = max(by_layer)
        data["num_experts"] = [by_layer.get(i, max(by_layer.values())) for i in range(top + 1)]
    return MoELoRAConfig.from_dict(data)


def _check_base(model: nn.Module, meta: dict[str, Any], cfg_path: Path) -> None:
    saved = meta["base_model"]
    problems = []
    if saved["model_class"] != type(model).__name__:
        problems.append(f"model class is {type(model).__name__}, adapter was saved on {saved['model_class']}")
    for name, info in saved["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name!r} does not exist")
            continue
        if not is_linear_like(module):
            problems.append(f"module {name!r} is a {type(module).__name__}, not an nn.Linear or Conv1D")
            continue
        if is_conv1d(module):  # weight (in, out)
            out_f, in_f = module.weight.shape[::-1]
        else:  # nn.Linear, or a quantized linear whose packed weight has another shape
            out_f, in_f = module.out_features, module.in_features
        if (in_f, out_f) != (info["in_features"], info["out_features"]):
            problems.append(
                f"module {name!r} has shape in={in_f}, out={out_f}; "
                f"adapter expects in={info['in_features']}, out={info['out_features']}"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise AdapterError(f"{cfg_path}: adapter does not match this base model: {shown}")


def load_adapter(base_model: nn.Module, path: str | os.PathLike, force: bool = False) -> nn.Module:
    """Add the adapters saved at ``path`` to a plain base model (in place) and return it.

    The restored A, B and router tensors are bit-identical to the saved ones (cast only when the base
    model's adapter dtype differs). Adapter parameters are trainable, everything else frozen; the frozen
    experts of the saved layers are frozen again (none for an adapter saved without frozen experts).

    Args:
        base_model: The plain base model (no adapters).
        path: The adapter directory.
        force: Load onto base weights that differ from those the adapter was trained on (a warning
            instead of an error; ``riemix.io.fingerprint``).

    Raises:
        AdapterError: missing/corrupt files, a tensor file whose checksum or contents do not match the
            config, a tensor holding NaN or inf, or a base model that differs (class, module names,
            shapes, or — unless ``force`` — the wrapped weights; all differences named).
    """
    path = Path(path)
    recover_dir(path)  # a save interrupted on a system without atomic exchange left it renamed aside
    meta = read_adapter_config(path)
    cfg_path = path / CONFIG_NAME
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{weights}: adapter weights not found")
    if file_sha256(weights) != meta.get("weights_sha256"):
        raise AdapterError(f"{weights}: checksum mismatch; the file is corrupt or does not belong to {cfg_path}")
    _check_base(base_model, meta, cfg_path)
    try:
        check_base_weights(base_model, meta["base_model"]["modules"], cfg_path, force)
    except ValueError as exc:
        raise AdapterError(str(exc)) from exc
    config = _config_from_meta(meta)
    saved_modules = meta["base_model"]["modules"]
    targets = find_target_modules(base_model, config)
    if set(targets) != set(saved_modules):
        missing, extra = sorted(set(saved_modules) - set(targets)), sorted(set(targets) - set(saved_modules))
        raise AdapterError(
            f"{cfg_path}: target_modules select a different set of modules on this model "
            f"(missing: {missing[:5]}, unexpected: {extra[:5]})"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights}: cannot read adapter weights: {exc}") from exc
    try:  # optional: the frozen-expert masks (taken out of ``tensors``)
        frozen = split_frozen_state(tensors, {n: info["num_experts"] for n, info in saved_modules.items()})
    except ValueError as exc:
        raise AdapterError(f"{weights}: {exc}") from exc
    expected: dict[str, tuple[int, ...]] = {}
    for name, info in saved_modules.items():
        expected.update(
            adapter_tensor_shapes(
                config, name, info["num_experts"], info["rank"], info["in_features"], info["out_features"]
            )
        )
    if set(expected) != set(tensors):
        diff = sorted(set(expected) ^ set(tensors))
        raise AdapterError(f"{weights}: tensor names differ from {cfg_path.name}: {diff[:5]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterError(f"{weights}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
        if tensors[key].is_floating_point() and not torch.isfinite(tensors[key]).all():
            bad = int((~torch.isfinite(tensors[key])).sum())
            raise AdapterError(f"{weights}: {key} holds {bad} non-finite value(s) (NaN or inf): a diverged run?")
    counts = {n: info["num_experts"] for n, info in saved_modules.items()}
    ranks = {n: _module_ranks(info) for n, info in saved_modules.items()}
    if config.init == "pissa":  # build plain layers, then rebuild the residual from the saved factors
        add_moe_lora(base_model, dataclasses.replace(config, init="zero_b"), counts, ranks)
        base_model.moe_lora_config = config
        for name, layer in iter_moe_lora_layers(base_model):
            restore_pissa(layer, tensors[f"{name}.pissa_down"], tensors[f"{name}.pissa_up"])
    else:
        add_moe_lora(base_model, config, counts, ranks)
    params = adapter_state_dict(base_model)
    buffers = tuple(f".{suffix}" for suffix in BUFFER_SUFFIXES)  # rebuilt above, not copied
    with torch.no_grad():
        for key, value in tensors.items():
            if not key.endswith(buffers):
                params[key].copy_(value)
    load_frozen_state(base_model, frozen)
    runtime = meta.get("runtime") or {}
    for _, layer in iter_moe_lora_layers(base_model):
        layer.scale_factor = float(runtime.get("scale_factor", 1.0))
        layer.router_temperature = float(runtime.get("router_temperature", config.router_temperature))
    return base_model
