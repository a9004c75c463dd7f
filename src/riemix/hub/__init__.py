"""Base models: name resolution (built-in packages, local paths, hub ids), loading and the GGUF cache.

Modules:
    resolve: the built-in table, :class:`ModelSource`, :func:`resolve_model_source`, the cache root.
    loading: :func:`load_model` (``transformers`` ``from_pretrained``, tokenizer finalisation, the
        load report), :data:`HEAD_NAMES` and :func:`num_labels_for`.
    probe: whether the Hugging Face hub is offline or unreachable.
    gguf_cache: the cross-process cache of dequantised built-in GGUF models.
"""

from riemix.hub.loading import HEAD_NAMES, load_model, num_labels_for
from riemix.hub.resolve import (
    CACHE_ENV_VAR,
    ModelLoadError,
    ModelSource,
    default_cache_dir,
    list_builtin_models,
    resolve_model_source,
)

__all__ = [
    "CACHE_ENV_VAR",
    "HEAD_NAMES",
    "ModelLoadError",
    "ModelSource",
    "default_cache_dir",
    "list_builtin_models",
    "load_model",
    "num_labels_for",
    "resolve_model_source",
]
