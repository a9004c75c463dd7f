"""Saving adapted models from the Hugging Face ecosystem without writing a checkpoint that loads wrong.

A ``MoELoRALinear`` keeps the module it wraps as ``base_layer``, so the state dict of an adapted model names
a targeted weight ``<module>.base_layer.weight``.  ``save_pretrained`` writes those names; a plain
``from_pretrained`` of the base architecture does not read them and silently re-initialises every targeted
weight.  This module keeps the two worlds apart:

- ``protect_save_pretrained(model)``: ``model.save_pretrained`` (and everything that calls it: ``Trainer``,
  ``push_to_hub``) refuses while the model carries adapters (``AdaptedSaveError``, pointing at
  ``riemix.save_adapter``), and saves normally once they are removed or merged;
- ``save_trainer_adapter`` / ``load_adapter_weights``: the adapter-only directories ``RiemixTrainer`` writes
  for ``save_model`` and for every checkpoint (``save_adapter``'s two files, next to the files ``Trainer``
  adds there), and their restoring into the adapted model of a resumed run.

Nothing here imports ``transformers``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from riemix.core.freezing import load_frozen_state, split_frozen_state
from riemix.core.layer import iter_moe_lora_layers
from riemix.core.state import ADAPTER_TENSORS, BUFFER_SUFFIXES, adapter_state_dict
from riemix.io.adapter import CONFIG_NAME, FORMAT_NAME, WEIGHTS_NAME, AdapterError, read_adapter_config, save_adapter
from riemix.io.fileio import atomic_write, file_sha256
from riemix.io.fingerprint import layer_weight_digest

__all__ = [
    "TRAINABLE_NAME",
    "AdaptedSaveError",
    "is_adapter_dir",
    "is_save_protected",
    "load_adapter_weights",
    "protect_save_pretrained",
    "save_trainer_adapter",
]

#: Trainable tensors outside the adapter (e.g. a new task head), saved next to the adapter when there are any.
TRAINABLE_NAME = "riemix_trainable.safetensors"


class AdaptedSaveError(ValueError):
    """``save_pretrained`` was called on a model carrying MoE-LoRA adapters (its checkpoint would load wrong)."""


def _refusal(model: nn.Module, names: list[str]) -> str:
    return (
        f"{type(model).__name__}.save_pretrained is refused while the model carries MoE-LoRA adapters: it would "
        f"write the {len(names)} adapted weights under '<module>.base_layer.weight' (e.g. "
        f"'{names[0]}.base_layer.weight'), which a plain from_pretrained does not read and silently "
        "re-initialises. Save the adapter with riemix.save_adapter(model, path) and reload it with "
        "riemix.load_adapter(<base model>, path); train with riemix.integrations.RiemixTrainer, whose "
        "save_model and checkpoints write the adapter only; for a standalone model use "
        "riemix.ship.export_model; or call riemix.remove_moe_lora(model) first to save the base model"
    )


class _SavePretrainedGuard:
    """Stands in for ``model.save_pretrained`` on the instance: refuses while the model carries adapters.

    It holds its model, so ``copy.deepcopy`` and pickling carry it over to the copy, which it then guards.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        names = [name for name, _ in iter_moe_lora_layers(self.model)]
        if names:
            raise AdaptedSaveError(_refusal(self.model, names))
        return type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)


def protect_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained`` refuse while the model carries MoE-LoRA adapters.

    The guard is set on the instance (the class is untouched) and checks at every call: after
    ``riemix.remove_moe_lora`` or a full merge it saves as usual.  A caller that means to write the adapted
    state dict under riemix's names (an export whose modeling code reads them) calls the class's method:
    ``type(model).save_pretrained(model, path)``.  Calling this twice is harmless.

    Args:
        model: Any module; one without a ``save_pretrained`` method (not a Hugging Face model) is returned
            unchanged.

    Returns:
        The same ``model``.
    """
    if not callable(getattr(type(model), "save_pretrained", None)) or is_save_protected(model):
        return model
    model.save_pretrained = _SavePretrainedGuard(model)
    return model


def is_save_protected(model: nn.Module) -> bool:
    """Whether ``protect_save_pretrained`` guards this model's ``save_pretrained``."""
    return isinstance(vars(model).get("save_pretrained"), _SavePretrainedGuard)


# ---------------------------------------------------------------- adapter-only trainer directories

def _adapter_ids(model: nn.Module) -> set[int]:
    """``id`` of every adapter tensor of the model's layers (``adapter_state_dict`` holds detached views)."""
    return {
        id(tensor)
        for _, layer in iter_moe_lora_layers(model)
        for entry in ADAPTER_TENSORS
        if (tensor := entry.get(layer)) is not None
    }


def _extra_trainables(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters that are not adapter tensors (a task head made trainable), by name."""
    adapter = _adapter_ids(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter}


def save_trainer_adapter(model: nn.Module, output_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the model's adapter into ``output_dir``, next to whatever files the directory already holds.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (``riemix.save_adapter``'s format:
    ``riemix.load_adapter(base, output_dir)`` reads it) and, when parameters outside the adapter are trainable
    (a task head), ``riemix_trainable.safetensors`` with them (its SHA-256 recorded in the config's
    ``extra``).  Each file is replaced atomically, the config last: until it is replaced, the previous
    config's checksum refuses the new weights, so an interrupted save is detected, never mixed silently.

    Args:
        model: A model carrying MoE-LoRA adapters.
        output_dir: The directory (created if needed; ``Trainer``'s checkpoints and run files stay).
        extra: JSON-serialisable metadata stored under ``"extra"`` in the config.

    Returns:
        The directory.

    Raises:
        ValueError: No adapters, or non-finite adapter or trainable tensors (``save_adapter``).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".riemix-save-", dir=out))
    try:
        meta_extra = dict(extra or {})
        trainable = {n: p.detach().to("cpu").contiguous().clone() for n, p in _extra_trainables(model).items()}
        bad = [n for n, t in trainable.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ValueError(f"refusing to save to {out}: non-finite values (NaN or inf) in {bad[:3]}")
        moves = []
        if trainable:
            written = atomic_write(tmp / TRAINABLE_NAME, lambda t: save_file(trainable, t, metadata={"format": "pt"}))
            meta_extra["trainable_sha256"] = file_sha256(written)
            moves.append(TRAINABLE_NAME)
        save_adapter(model, tmp / "adapter", extra=meta_extra)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / "adapter" / name, tmp / name)
        moves += [WEIGHTS_NAME, CONFIG_NAME]  # the config last
        if not trainable:
            (out / TRAINABLE_NAME).unlink(missing_ok=True)  # left by an earlier save of another model
        for name in moves:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a riemix adapter config (``adapter_config.json`` of riemix's format)."""
    cfg = Path(path) / CONFIG_NAME
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _check_layers(model: nn.Module, modules: dict[str, Any], cfg_path: Path) -> None:
    """The saved modules are this model's adapted layers, of the same dimensions, wrapping the same weights."""
    layers = dict(iter_moe_lora_layers(model))
    if not layers:
        raise AdapterError(
            f"{cfg_path}: the model has no MoE-LoRA adapters to load into; load an adapter onto a plain base "
            "model with riemix.load_adapter"
        )
    if set(layers) != set(modules):
        missing, unexpected = sorted(set(modules) - set(layers)), sorted(set(layers) - set(modules))
        raise AdapterError(
            f"{cfg_path}: the adapter adapts other modules than this model (saved only: {missing[:5]}, "
            f"model only: {unexpected[:5]})"
        )
    differ = []
    for name, info in modules.items():
        layer = layers[name]
        here = (layer.in_features, layer.out_features, layer.num_experts, layer.rank)
        saved = (info["in_features"], info["out_features"], info["num_experts"], info["rank"])
        if here != saved:
            raise AdapterError(
                f"{cfg_path}: module {name!r} has (in, out, experts, rank) = {here}, the adapter {saved}"
            )
        if info.get("weight_sha256") is not None and layer_weight_digest(layer)[0] != info["weight_sha256"]:
            differ.append(name)
    if differ:
        raise AdapterError(
            f"{cfg_path}: the model's base weights differ from those the adapter was saved on in {len(differ)} "
            f"module(s) (e.g. {', '.join(differ[:3])}): another base checkpoint or dtype?"
        )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{path}: cannot read tensors: {exc}") from exc


def _check_tensors(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: Path) -> None:
    if set(params) != set(tensors):
        diff = sorted(set(params) ^ set(tensors))
        raise AdapterError(f"{where}: tensor names differ from the model's: {diff[:5]}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise AdapterError(f"{where}: {key} has shape {tuple(value.shape)}, the model's {tuple(params[key].shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterError(f"{where}: {key} holds non-finite values (NaN or inf)")


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Copy the adapter (and trainable tensors) saved in ``path`` into a model that already carries adapters.

    The counterpart of ``save_trainer_adapter`` for a resumed run or a best-model reload: the model has the
    same adapted layers (``add_moe_lora`` with the same config); nothing changes before every check passed.

    Args:
        model: The adapted model.
        path: A directory written by ``save_trainer_adapter`` (or ``riemix.save_adapter``).

    Returns:
        The same ``model``.

    Raises:
        AdapterError: Not an adapter directory, missing or corrupt files (checksums), other adapted modules,
            dimensions or base weights than the model's, tensors of other names or shapes, or non-finite
            values (each named).
    """
    path = Path(path)
    meta = read_adapter_config(path)
    cfg_path, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{weights}: adapter weights not found")
    if file_sha256(weights) != meta["weights_sha256"]:
        raise AdapterError(f"{weights}: checksum mismatch; the file is corrupt or does not belong to {cfg_path}")
    _check_layers(model, meta["base_model"]["modules"], cfg_path)
    buffers = tuple(f".{suffix}" for suffix in BUFFER_SUFFIXES)  # PiSSA factors: fixed by the base, not trained
    params = {k: v for k, v in adapter_state_dict(model).items() if not k.endswith(buffers)}
    tensors = {k: v for k, v in _read_tensors(weights).items() if not k.endswith(buffers)}
    try:  # the frozen-expert masks, when any: taken out of ``tensors``, set after the copy
        frozen = split_frozen_state(tensors, {n: layer.num_experts for n, layer in iter_moe_lora_layers(model)})
    except ValueError as exc:
        raise AdapterError(f"{weights}: {exc}") from exc
    extra = meta.get("extra") or {}
    trainable_file = path / TRAINABLE_NAME
    trainable, saved = _extra_trainables(model), {}
    if extra.get("trainable_sha256") is not None:
        if not trainable_file.is_file() or file_sha256(trainable_file) != extra["trainable_sha256"]:
            raise AdapterError(f"{trainable_file}: missing or corrupt (checksum mismatch with {cfg_path})")
        saved = _read_tensors(trainable_file)
    _check_tensors(params, tensors, weights)
    _check_tensors(trainable, saved, trainable_file)  # both checked before anything is copied
    with torch.no_grad():
        for source, target in ((tensors, params), (saved, trainable)):
            for key, value in source.items():
                target[key].copy_(value)
    load_frozen_state(model, frozen)  # the saved frozen experts; none when the adapter has no masks
    runtime = meta.get("runtime") or {}
    for _, layer in iter_moe_lora_layers(model):
        layer.scale_factor = float(runtime.get("scale_factor", layer.scale_factor))
        layer.router_temperature = float(runtime.get("router_temperature", layer.router_temperature))
    return model
