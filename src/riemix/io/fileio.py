"""Atomic writes of files and whole directories; the only atomic-write code in riemix.

Files: write to a temporary name in the same directory, fsync, then rename. A crash at any point
leaves either the old file or the new one, never a half-written file.

Directories: build the complete directory in a hidden sibling (:func:`sibling_temp_path`), then
:func:`publish_dir` flushes it to disk and renames it into place. A directory already in the way is
either kept (when the caller says it is as good as ours: another process published it first) or
swapped with the new one in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux) and then deleted, so at
every instant the final path holds the complete old directory or the complete new one. Where the
exchange is not available it is renamed aside first (a crash in that instant leaves the old copy under
its hidden ``.old`` name, which :func:`recover_dir` puts back). Temporary names carry the host and process id, so
:func:`clean_stale_temp_dirs` can tell leftovers of crashed writers from directories of writers
still running (on this host or another one sharing the folder).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "STALE_AGE_S",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "clean_stale_temp_dirs",
    "discard_dir",
    "file_sha256",
    "fsync_tree",
    "publish_dir",
    "recover_dir",
    "sibling_temp_path",
]

logger = logging.getLogger(__name__)

STALE_AGE_S = 24 * 3600
"""Age after which a temporary directory of another host is assumed abandoned (one day)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open(path, "w") gives a new file under this process's umask


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` then atomically rename ``tmp_path`` to ``path``.

    Args:
        path: final destination.
        writer: function that writes the complete file at the temporary path it is given.

    Returns:
        The final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; published files get the mode open() would give
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        full = _disk_full(exc, path.parent)  # judged before the partial file is removed
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:  # writers (safetensors, torch.save) report a full disk in their own words, or no path
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


_NEARLY_FULL_BYTES = 1 << 20


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, or any error with under 1 MiB left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON to ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- directories


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


def sibling_temp_path(final: str | os.PathLike, kind: str = "tmp") -> Path:
    """Return a fresh hidden name beside ``final`` for a directory being built or thrown away.

    Args:
        final: The directory the temporary one stands in for.
        kind: ``"tmp"`` for a build in progress, ``"old"`` for a directory being deleted.

    Returns:
        ``<parent>/.<name>.<kind>.<host>.<pid>.<random>``. Nothing is created.
    """
    final = Path(final)
    return final.parent / f".{final.name}.{kind}.{_host_tag()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def clean_stale_temp_dirs(final: str | os.PathLike, max_age_s: float = STALE_AGE_S) -> None:
    """Remove the temporary directories of ``final`` left behind by crashed writers.

    A directory is stale when its writer ran on this host and is dead, or when it is older than
    ``max_age_s``. Directories of writers still running (here or on another host sharing the
    folder) are kept.

    Args:
        final: The directory whose :func:`sibling_temp_path` siblings are inspected.
        max_age_s: Age in seconds after which any temporary directory counts as abandoned.
    """
    final = Path(final)
    host = _host_tag()
    for prefix in (f".{final.name}.tmp.", f".{final.name}.old."):
        for entry in final.parent.glob(f"{prefix}*"):
            parts = entry.name[len(prefix) :].rsplit(".", 2)
            stale = False
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
                stale = not _pid_alive(int(parts[1]))
            if not stale:
                with contextlib.suppress(OSError):
                    stale = time.time() - entry.stat().st_mtime > max_age_s
            if stale:
                logger.info("removing leftover temporary directory %s", entry)
                shutil.rmtree(entry, ignore_errors=True)


def fsync_tree(directory: str | os.PathLike) -> None:
    """Flush the files of a freshly written directory so a rename publishes complete data."""
    directory = Path(directory)
    for path in directory.rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError), open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for sub in [*(p for p in directory.rglob("*") if p.is_dir()), directory]:
        _fsync_dir(sub)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry change (a rename) to disk."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def discard_dir(path: str | os.PathLike) -> None:
    """Delete a directory: rename it aside first (so it vanishes at once), then remove it.

    A missing ``path`` is not an error.
    """
    trash = sibling_temp_path(path, "old")
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.cache
def _renameat2():
    """libc's ``renameat2`` (looked up once), or None where the C library has none."""
    try:
        func = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2``); False where that is not available."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def recover_dir(final: str | os.PathLike) -> bool:
    """Put back a directory a crashed :func:`publish_dir` had renamed aside (no-exchange fall-back).

    When ``final`` is missing and a complete ``.old`` sibling of a dead writer exists, it is renamed back.

    Returns:
        Whether a directory was restored.
    """
    final = Path(final)
    if final.exists():
        return False
    for entry in sorted(final.parent.glob(f".{final.name}.old.*"), key=lambda p: p.stat().st_mtime, reverse=True):
        parts = entry.name[len(f".{final.name}.old.") :].rsplit(".", 2)
        if len(parts) == 3 and parts[0] == _host_tag() and parts[1].isdigit() and _pid_alive(int(parts[1])):
            continue  # its writer is still running
        with contextlib.suppress(OSError):
            os.rename(entry, final)
            logger.warning("restored %s from %s (left by an interrupted write)", final, entry.name)
            return True
    return False


def publish_dir(
    tmp: str | os.PathLike,
    final: str | os.PathLike,
    keep_existing: Callable[[Path], bool] | None = None,
    attempts: int = 3,
) -> bool:
    """Flush a complete directory ``tmp`` to disk and atomically rename it to ``final``.

    A directory already at ``final`` is kept when ``keep_existing(final)`` is true (e.g. another
    process published a valid copy first; ``tmp`` is then left for the caller to delete).
    Otherwise the two are swapped atomically (``renameat2(RENAME_EXCHANGE)``) and the old one deleted;
    where the exchange is unavailable the old one is renamed aside, ours renamed in, and only then is the
    old one deleted (a crash in between leaves it complete for :func:`recover_dir`).

    Args:
        tmp: The fully written directory, normally a :func:`sibling_temp_path` of ``final``.
        final: Where it is published.
        keep_existing: Decides whether a directory found at ``final`` wins over ours; ``None``
            always replaces it.
        attempts: How many times the rename is tried while something keeps re-creating ``final``.

    Returns:
        ``True`` if ``tmp`` was published, ``False`` if an existing directory was kept.

    Raises:
        FileExistsError: If ``final`` still stood in the way after ``attempts`` tries.
        OSError: If the rename fails for another reason.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if final.is_dir():
        if keep_existing is not None and keep_existing(final):
            return False
        if _exchange(tmp, final):  # one atomic step: no instant without a complete directory at final
            _fsync_dir(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old directory
            return True
    asides: list[Path] = []  # old directories moved out of the way, deleted once ours is in place
    try:
        for _ in range(attempts):
            try:
                os.rename(tmp, final)
                _fsync_dir(final.parent)
                return True
            except OSError:
                if not final.exists():
                    raise
            if keep_existing is not None and keep_existing(final):
                return False
            asides.append(_move_aside(final))  # complete until ours is in: recover_dir can put it back
        raise FileExistsError(f"could not publish {tmp} at {final}: the path kept being re-created")
    finally:
        for aside in asides:
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to a hidden ``.old`` sibling (nothing is deleted) and return the new name."""
    aside = sibling_temp_path(path, "old")
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, aside)
        _fsync_dir(path.parent)
    return aside
