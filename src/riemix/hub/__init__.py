"""Base models: name resolution (built-in packages, local paths, hub ids), loading and the GGUF cache."""

from riemix.hub.loading import (
    CACHE_ENV_VAR,
    ModelLoadError,
    ModelSource,
    default_cache_dir,
    list_builtin_models,
    load_model,
    resolve_model_source,
)

__all__ = [
    "CACHE_ENV_VAR",
    "ModelLoadError",
    "ModelSource",
    "default_cache_dir",
    "list_builtin_models",
    "load_model",
    "resolve_model_source",
]
