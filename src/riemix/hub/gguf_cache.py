"""The cross-process cache of built-in GGUF models converted to plain Hugging Face directories.

The first load of a built-in GGUF model (``smollm2-135m``) dequantises it, which takes about 20 s
on a laptop CPU, and writes the result (safetensors + tokenizer) to ``<cache>/models/<name>/``;
every later load reads that copy (a few seconds).

The copy is built in a hidden sibling directory and published with
:func:`riemix.io.fileio.publish_dir`, so an interrupted build never leaves a half-written cache
behind. A marker file, written last, records the source it was built from (package, version, file
name and size); a directory without a matching marker is never trusted and is rebuilt. Several
processes (possibly on several hosts sharing the cache) may build at once: the first valid copy
published wins and the others discard theirs. Temporary directories of crashed builds are removed
by the next build.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from riemix.hub.resolve import BuiltinSpec, ModelLoadError, distribution_version
from riemix.io.fileio import clean_stale_temp_dirs, discard_dir, publish_dir, sibling_temp_path

__all__ = ["CACHE_FORMAT", "CACHE_MARKER", "ensure_gguf_cache"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of the cache layout; a marker with another version is rebuilt."""
CACHE_MARKER = "riemix_cache.json"
"""File written last into a complete cache directory."""


def _source_identity(spec: BuiltinSpec, source_path: Path) -> str:
    size = source_path.stat().st_size if source_path.is_file() else 0
    version = distribution_version(spec.distribution)
    return f"{spec.distribution}=={version}:{source_path.name}:{size}"


def _cache_is_valid(directory: Path, identity: str) -> bool:
    try:
        marker = json.loads((directory / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == CACHE_FORMAT
        and marker.get("source") == identity
        and (directory / "config.json").is_file()
    )


def ensure_gguf_cache(
    spec: BuiltinSpec,
    gguf_path: Path,
    cache_root: Path,
    build: Callable[[Path], None],
    rebuild: bool = False,
) -> Path:
    """Return the cached Hugging Face copy of a built-in GGUF model, building it if needed.

    Args:
        spec: The built-in model.
        gguf_path: Its GGUF file (its size and package version identify the cache's source).
        cache_root: The riemix cache root; the copy lives in ``<cache_root>/models/<name>``.
        build: Writes the converted model and tokenizer into the (empty) directory it is given.
        rebuild: Throw away an existing copy even if its marker is valid (e.g. it proved unreadable).

    Returns:
        The cache directory.

    Raises:
        ModelLoadError: If the copy could not be published because the path kept being re-created.
    """
    final = cache_root / "models" / spec.name
    identity = _source_identity(spec, gguf_path)
    if not rebuild and _cache_is_valid(final, identity):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(final)
    tmp = sibling_temp_path(final)
    tmp.mkdir()
    try:
        logger.info("converting %s to a Hugging Face checkpoint in %s (one-off, ~20 s)", gguf_path, final)
        start = time.perf_counter()
        build(tmp)
        marker = {
            "format": CACHE_FORMAT,
            "source": identity,
            "builtin": spec.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # The marker is written last: a directory without it is never treated as a cache.
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if rebuild:
            discard_dir(final)
        try:
            published = publish_dir(tmp, final, keep_existing=lambda found: _cache_is_valid(found, identity))
        except FileExistsError as err:
            raise ModelLoadError(f"could not publish the model cache at {final}") from err
        if published:
            logger.info("cached %s in %.1f s", spec.name, time.perf_counter() - start)
        else:
            logger.info("another process already cached %s; using its copy", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
