"""The run directory a training writes: checked before the model loads, locked while training, never
silently reused.

``open_run(cfg)`` decides what happens to ``cfg.output_dir``:

- missing or empty: a new run (a fresh ``run_id`` in ``run.json``);
- holding a run and ``resume``: that run continues; its saved ``config.yaml`` must agree with ``cfg`` on
  everything but the fields of ``RESUME_SAFE_FIELDS`` (each difference is named);
- holding a run and ``overwrite``: the old run is deleted first (only a riemix run directory: one with
  ``config.yaml`` or ``run.json``);
- anything else is refused, naming the directory and the three ways out.

While a run trains, ``<output_dir>/.riemix.lock`` names its process, host and run id; a second writer is
refused, and the lock of a process that died (same host, pid gone) is taken over, saying so.  Checkpoints
record the run id, so a resume only continues its own run's checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riemix.io.fileio import _pid_alive, atomic_write_json, atomic_write_text, discard_dir
from riemix.training.config import RESUME_SAFE_FIELDS, TrainConfig

__all__ = [
    "LOCK_NAME",
    "MIN_FREE_BYTES",
    "RUN_FILE",
    "RunDir",
    "check_output_dir",
    "config_differences",
    "open_run",
    "truncate_metrics",
]

LOCK_NAME = ".riemix.lock"
RUN_FILE = "run.json"
MIN_FREE_BYTES = 100 * 2**20
"""Free space a run directory's file system needs at the start (checkpoints, adapter, metrics)."""
_FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")


def _is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` / Accelerate launch (or a single process): the one that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(path: str | Path, min_free: int = MIN_FREE_BYTES) -> Path:
    """Refuse an output directory the run could not write, before anything is loaded.

    Args:
        path: The run directory (created if missing).
        min_free: Bytes of free space required on its file system.

    Returns:
        The directory, created.

    Raises:
        ValueError: ``path`` is a file, lies under a file or under /proc, /sys or /dev, cannot be created or
            written (read-only, permissions), or its file system has less than ``min_free`` bytes free.
    """
    path = Path(path)
    resolved = path.resolve()
    for root in _FORBIDDEN_ROOTS:
        if resolved == Path(root) or Path(root) in resolved.parents:
            raise ValueError(f"output_dir {path} is under {root}, which holds no files a run can write")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {path} is a file, not a directory")
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"output_dir {path} is under {parent}, which is a file")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".riemix-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"output_dir {path} cannot be written: {exc.strerror or exc}") from exc
    free = shutil.disk_usage(path).free
    if free < min_free:
        raise ValueError(
            f"output_dir {path}: only {free / 2**20:.1f} MiB free on its file system; a run needs at least "
            f"{min_free / 2**20:.0f} MiB (checkpoints, adapter, metrics)"
        )
    return path


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """The fields (``adapter.rank`` for adapter fields) where ``current`` differs from ``saved`` and which a
    resume may not change: every field but those of ``RESUME_SAFE_FIELDS``.

    Returns:
        One ``"<field>: <saved> in the run, <current> now"`` line per difference.
    """
    old, new = _flatten(saved.to_dict()), _flatten(current.to_dict())
    return [
        f"{key}: {old.get(key)!r} in the run, {new.get(key)!r} now"
        for key in sorted(set(old) | set(new))
        if key not in RESUME_SAFE_FIELDS and old.get(key) != new.get(key)
    ]


def truncate_metrics(path: Path, step: int) -> int:
    """Cut ``metrics.jsonl`` back to the entries of steps ``<= step`` (a resume continues from there), and
    drop a torn last line a crash left. Rewritten atomically.

    Returns:
        How many lines were dropped.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            keep = isinstance(entry, dict) and int(entry.get("step", -1)) <= step
        except (json.JSONDecodeError, TypeError, ValueError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


@dataclass
class RunDir:
    """An opened run directory (see ``open_run``); a context manager that releases the lock on exit.

    Attributes:
        path: The directory.
        run_id: This run's id (kept across resumes; None for a run written before run ids).
        resuming: Whether an existing run continues.
        locked: Whether this process holds the lock (the main process only).
    """

    path: Path
    run_id: str | None
    resuming: bool
    locked: bool = False

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.locked:
            lock = self.path / LOCK_NAME
            try:
                if json.loads(lock.read_text(encoding="utf-8")).get("pid") == os.getpid():
                    lock.unlink()
            except (OSError, ValueError):
                pass
            self.locked = False

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _acquire_lock(path: Path, run_id: str | None, log) -> None:
    """Create ``<path>/.riemix.lock`` exclusively; take over the lock of a dead process on this host."""
    lock = path / LOCK_NAME
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "run_id": run_id, "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                held = {}
            pid, where = held.get("pid"), held.get("host")
            if not held and not lock.exists():  # released between our attempt and the read: try again
                continue
            if isinstance(pid, int) and where == host and not _pid_alive(pid):
                log(f"warning: removing the stale lock of process {pid} (no longer running) in {path}")
            elif not held and time.time() - lock.stat().st_mtime > 60:
                log(f"warning: removing an unreadable stale lock file {lock}")
            else:
                raise ValueError(
                    f"output_dir {path} is in use by another training (pid {pid} on host {where!r}, run "
                    f"{held.get('run_id')}); wait for it, or delete {lock} if that process is gone"
                ) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return
    raise ValueError(f"could not lock output_dir {path}: {lock} kept reappearing")


def _holds_run(path: Path) -> list[str]:
    """The entries of ``path`` besides the lock (a non-empty list: the directory is in use)."""
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME and not p.name.startswith(".riemix-write"))


def _read_run_id(path: Path) -> str | None:
    try:
        return json.loads((path / RUN_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def open_run(cfg: TrainConfig, log=print) -> RunDir:
    """Check, lock and prepare ``cfg.output_dir`` for this run (see the module docstring).

    Called before the model loads, so a bad directory costs nothing. Only the main process checks, locks
    and deletes; the others read the run id.

    Raises:
        ValueError: an unwritable directory (``check_output_dir``), a directory in use by another training,
            one holding files without ``resume``/``overwrite``, ``overwrite`` of a directory that is not a
            riemix run, ``resume`` without a saved run, or a resume whose config differs in a field it may
            not change (all differences named).
    """
    path = Path(cfg.output_dir)
    if not _is_main_process():
        return RunDir(path, _read_run_id(path), bool(cfg.resume))
    check_output_dir(path)
    run_id = _read_run_id(path) if cfg.resume else None
    _acquire_lock(path, run_id, log)
    run = RunDir(path, run_id, bool(cfg.resume), locked=True)
    try:
        _prepare(cfg, run, log)
    except BaseException:
        run.release()
        raise
    return run


def _prepare(cfg: TrainConfig, run: RunDir, log) -> None:
    path, entries = run.path, _holds_run(run.path)
    is_run = (path / "config.yaml").is_file() or (path / RUN_FILE).is_file()
    if cfg.resume:
        if not (path / "config.yaml").is_file():
            raise ValueError(f"resume: {path} holds no run to continue (no config.yaml); start it without --resume")
        saved = TrainConfig.from_yaml(path / "config.yaml")
        diffs = config_differences(saved, cfg)
        if diffs:
            raise ValueError(
                f"resume: the configuration differs from the run saved in {path / 'config.yaml'} in fields a "
                f"resume may not change: {'; '.join(diffs)} (start a new run with another --output-dir, or "
                f"--overwrite to replace this one)"
            )
        return
    if entries and not cfg.overwrite:
        raise ValueError(
            f"output_dir {path} already holds {'a run' if is_run else 'files'} ({', '.join(entries[:5])}); pass "
            f"--resume to continue it, --overwrite to replace it, or choose another --output-dir"
        )
    if entries:  # overwrite
        if not is_run:
            raise ValueError(
                f"overwrite: {path} is not a riemix run directory (no config.yaml or {RUN_FILE}); refusing to "
                f"delete {entries[:5]}"
            )
        log(f"overwrite: deleting the previous run in {path}")
        for name in entries:
            target = path / name
            if target.is_dir() and not target.is_symlink():
                discard_dir(target)
            else:
                target.unlink()
    run.run_id = uuid.uuid4().hex[:12]
    atomic_write_json(path / RUN_FILE, {"run_id": run.run_id, "created": time.time()})
    _rewrite_lock(path, run.run_id)


def _rewrite_lock(path: Path, run_id: str) -> None:
    """Record the new run id in the lock this process holds."""
    lock = path / LOCK_NAME
    try:
        record = json.loads(lock.read_text(encoding="utf-8"))
        record["run_id"] = run_id
        atomic_write_json(lock, record)
    except (OSError, ValueError) as exc:
        if getattr(exc, "errno", None) not in (errno.ENOENT, None):
            raise
