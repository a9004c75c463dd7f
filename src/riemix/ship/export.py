"""Export a model with its MoE-LoRA adapter as a directory that transformers alone serves: ``export_model``.

The directory (built aside and published whole, ``riemix.io.fileio.publish_dir``) holds:

- ``config.json``: the base model's config plus ``auto_map`` (``AutoModelForCausalLM`` ->
  ``modeling_riemix.RiemixMoELoRAForCausalLM``) and ``riemix_moe_lora`` (per adapted module: experts, rank,
  routing, top_k, top_p, router temperature, scale s·f and whether it has expert scales);
- ``model.safetensors``: the base weights and the adapter tensors under riemix's module names
  (``<module>.base_layer.weight``, ``<module>.lora_A``, ...; a PiSSA base weight is the residual);
- ``modeling_riemix.py``: ``riemix/ship/modeling_riemix.py`` with ``BASE_MODEL_CLASS`` set, torch and
  transformers only;
- ``generation_config.json`` and the tokenizer files.

so that ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` computes riemix's eval-mode
forward without riemix installed.  With ``merge=True`` (every layer ``routing="global"`` or single-expert,
see ``riemix.core.merge``) the adapters are folded into the base weights instead and the directory is a
plain model of the base architecture (no remote code).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from riemix.core.layer import iter_moe_lora_layers
from riemix.core.merge import merge_adapter, unmergeable_layers
from riemix.hub.loading import no_progress_bars
from riemix.io.fileio import atomic_write_json, atomic_write_text, publish_dir, sibling_temp_path
from riemix.ship.loading import load_adapted

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_ROUTING_MODES",
    "MODELING_FILE",
    "check_export_dir",
    "check_exportable",
    "export_model",
    "export_spec",
    "modeling_source",
]

#: The routing modes ``modeling_riemix.py`` implements (its ``ROUTING_MODES``; a test keeps them equal).
EXPORT_ROUTING_MODES = ("softmax_topk", "topk_softmax", "dense", "top_p", "global")
#: The modeling file's name in an export (the module of ``auto_map``).
MODELING_FILE = "modeling_riemix.py"
#: ``format`` of the ``riemix_moe_lora`` entry of an exported config.json.
EXPORT_FORMAT = "riemix-moe-lora-export"
_SPEC_KEY = "riemix_moe_lora"
_MODEL_CLASS = "RiemixMoELoRAForCausalLM"
_BASE_LINE = re.compile(r'^BASE_MODEL_CLASS = "\w+"', re.MULTILINE)


def modeling_source(base_class: str) -> str:
    """The text of ``modeling_riemix.py`` for a base architecture.

    Args:
        base_class: a transformers model class name, e.g. ``"LlamaForCausalLM"``.

    Returns:
        The file with ``BASE_MODEL_CLASS = "<base_class>"``.
    """
    if not re.fullmatch(r"\w+", base_class):
        raise ValueError(f"base_class must be a class name, got {base_class!r}")
    text = Path(__file__).with_name(MODELING_FILE).read_text(encoding="utf-8")
    out, count = _BASE_LINE.subn(f'BASE_MODEL_CLASS = "{base_class}"', text)
    assert count == 1, f"{MODELING_FILE} must set BASE_MODEL_CLASS exactly once"
    return out


def check_export_dir(out: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None) -> None:
    """Refuse an export directory that cannot be (re)placed, before anything is loaded.

    Args:
        out: the export directory.
        overwrite: replace an existing non-empty directory.
        source: the run or adapter directory exported from, which ``out`` must neither be nor contain.

    Raises:
        ValueError: ``out`` is a file, is (or contains) ``source``, or is a non-empty directory without
            ``overwrite``.
    """
    where = Path(out)
    if where.exists() and not where.is_dir():
        raise ValueError(f"{where}: the export directory is a file")
    if source is not None:
        src, dst = Path(source).resolve(), where.resolve()
        if dst == src or dst in src.parents:
            raise ValueError(f"{where}: the export directory would replace the source {source}; choose another")
    if where.is_dir() and any(where.iterdir()) and not overwrite:
        raise ValueError(
            f"{where}: the export directory exists and is not empty; choose a new one or pass --overwrite "
            "(overwrite=True) to replace it"
        )


def _causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def check_exportable(model: nn.Module, merge: bool = False) -> None:
    """Refuse a model that ``export_model`` cannot write faithfully.

    Args:
        model: the adapted model.
        merge: whether the adapters are to be merged (``riemix.core.merge``) instead.

    Raises:
        ValueError: not a transformers causal LM class, no MoE-LoRA layer, a layer whose routing mode
            the modeling file does not implement (or, with ``merge``, whose gates depend on the input), a layer
            with experts of different ranks or immature experts (without ``merge``), or non-finite adapter
            tensors; each names the class, layers or modes.
    """
    import transformers

    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model) or name not in _causal_lm_classes():
        raise ValueError(
            f"export builds the base architecture from transformers' causal LM classes by name; {name} is not "
            "one of them (export an AutoModelForCausalLM model)"
        )
    layers = list(iter_moe_lora_layers(model))
    if not layers:
        raise ValueError(f"{name} has no MoE-LoRA adapters to export (add_moe_lora or load_adapter first)")
    unsupported = {n: layer.routing for n, layer in layers if layer.routing not in EXPORT_ROUTING_MODES}
    if unsupported:
        modes = sorted(set(unsupported.values()))
        raise ValueError(
            f"cannot export routing mode(s) {modes} (layers {list(unsupported)[:3]}); the exported modeling "
            f"file implements {EXPORT_ROUTING_MODES}"
        )
    mixed = [(n, layer.expert_ranks) for n, layer in layers if layer.rank_scale is not None]
    if mixed and not merge:
        raise ValueError(
            f"cannot export {len(mixed)} layer(s) whose experts have different ranks (e.g. {mixed[0][0]} with "
            f"expert_ranks={mixed[0][1]}): the exported modeling file scales every expert of a layer alike"
        )
    young = [n for n, layer in layers if layer.routing_now().immature]
    if young and not merge:
        raise ValueError(
            f"cannot export {len(young)} layer(s) with immature experts (e.g. {young[0]}): they route densely "
            "(maturity routing), the exported modeling file routes with each layer's own mode; train until the "
            "experts are mature or mark them mature (MoELoRALinear.mark_mature)"
        )
    if merge and (left := unmergeable_layers(model)):
        raise ValueError(
            f"merge=True (--merge): {len(left)} layer(s) have input-dependent gates and cannot be merged "
            f"(e.g. {next(iter(left))} with routing={next(iter(left.values()))!r}); export without merging"
        )
    bad = [
        f"{n}.{attr}"
        for n, layer in layers
        for attr in ("lora_A", "lora_B", "global_gate", "expert_scale")
        if getattr(layer, attr) is not None and not torch.isfinite(getattr(layer, attr)).all()
    ]
    bad += [
        f"{n}.router.weight"
        for n, layer in layers
        if layer.router is not None and not torch.isfinite(layer.router.weight).all()
    ]
    if bad:
        raise ValueError(f"refusing to export non-finite adapter tensors (NaN or inf): {bad[:3]}")


def export_spec(model: nn.Module) -> dict[str, Any]:
    """The ``riemix_moe_lora`` entry of an exported config.json: what ``modeling_riemix.py`` rebuilds.

    Args:
        model: the adapted model.

    Returns:
        ``{"format", "format_version", "adapter_config", "layers": {module: {num_experts, rank, routing,
        top_k, top_p, temperature, scaling, expert_scales}}}``; ``scaling`` is s·f (scale warm-up included).
    """
    config = getattr(model, "moe_lora_config", None)
    layers = {
        name: {
            "num_experts": layer.num_experts,
            "rank": layer.rank,
            "routing": layer.routing,
            "top_k": layer.top_k,
            "top_p": layer.top_p,
            "temperature": layer.router_temperature,
            "scaling": layer.scaling * layer.scale_factor,
            "expert_scales": layer.expert_scale is not None,
        }
        for name, layer in iter_moe_lora_layers(model)
    }
    return {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "adapter_config": None if config is None else config.to_dict(),
        "layers": layers,
    }


def _write(model: nn.Module, tokenizer: Any, tmp: Path, merge: bool) -> None:
    """Write the export's files into the (new, empty) directory ``tmp``."""
    spec = None if merge else export_spec(model)
    base_class = type(model).__name__
    if merge:
        model = merge_adapter(model)
    with no_progress_bars():
        # the class's method: the modeling file reads riemix's module names, which an adapted model's own
        # save_pretrained refuses to write (riemix.integrations.protect_save_pretrained)
        type(model).save_pretrained(model, tmp)
    if not merge:
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        config["auto_map"] = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{_MODEL_CLASS}"}
        config["architectures"] = [_MODEL_CLASS]
        config[_SPEC_KEY] = spec
        atomic_write_json(tmp / "config.json", config)
        atomic_write_text(tmp / MODELING_FILE, modeling_source(base_class))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def export_model(
    model_or_path: nn.Module | str | os.PathLike,
    out: str | os.PathLike,
    tokenizer: Any = None,
    base_model: str | None = None,
    merge: bool = False,
    overwrite: bool = False,
    dtype: str = "float32",
) -> Path:
    """Write a self-contained directory that ``AutoModelForCausalLM.from_pretrained`` serves.

    Args:
        model_or_path: An adapted causal LM (left unchanged), or a run directory / adapter directory to
            load it from (``riemix.ship.loading.load_adapted``).
        out: The export directory (published whole; must be new or empty unless ``overwrite``).
        tokenizer: Tokenizer to save with it (default for a path: the base model's).
        base_model: Base model of an adapter directory (default for a run directory: its config.yaml's).
        merge: Fold the adapters into the base weights (exact for routing global or single-expert layers
            only): a plain model, no remote code.
        overwrite: Replace an existing non-empty export directory.
        dtype: Weight dtype of the base model loaded from a path.

    Returns:
        The export directory; load it with ``AutoModelForCausalLM.from_pretrained(out,
        trust_remote_code=True)`` (``trust_remote_code`` is not needed after ``merge``).

    Raises:
        ValueError: a bad export directory (``check_export_dir``), ``base_model`` given with a model, a
            model that cannot be exported (``check_exportable``), or a bad path (``load_adapted``).
        riemix.hub.ModelLoadError, riemix.AdapterError: the model or adapter of a path cannot be loaded.
    """
    out = Path(out)
    from_path = not isinstance(model_or_path, nn.Module)
    check_export_dir(out, overwrite, model_or_path if from_path else None)
    if from_path:
        model, loaded = load_adapted(base_model, model_or_path, dtype)
        tokenizer = loaded if tokenizer is None else tokenizer
    elif base_model is not None:
        raise ValueError("base_model applies to a run or adapter directory, not to a model object")
    else:
        model = model_or_path
    check_exportable(model, merge)
    if merge and not from_path:
        model = copy.deepcopy(model)  # merging is in place: leave the caller's model as it was
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_path(out)
    tmp.mkdir()
    try:
        _write(model, tokenizer, tmp, merge)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
