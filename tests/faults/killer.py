"""Fault injection for tests/faults: run a scenario in a child process and SIGKILL it at a chosen point.

Children come from a ``forkserver``: one fresh interpreter (started by exec, never forked from pytest)
imports torch, transformers' Llama and riemix once, without running any torch computation, and forks
every child from that clean state.  So a child costs milliseconds instead of the 3 s of importing torch,
and no child inherits an OpenMP thread pool (the reason never to fork pytest itself).

The file-system write boundaries of a save are the calls that change what is on disk, counted in the
child by wrapping the primitives riemix's writers reach (:func:`install`): ``os.mkdir`` (of a directory
not there yet), ``os.open`` / ``open`` for writing, ``os.fsync``, ``os.replace``, ``os.rename``,
``os.unlink`` / ``os.remove``, ``os.rmdir``, ``riemix.io.fileio._exchange``, and the two serialisers whose
writes happen in native code (safetensors' ``save_file`` and ``torch.save``); only calls on paths inside
the test's directory count.  After each serialiser a "torn" boundary is added: dying there truncates the
file just written to half its size first, as a kill in the middle of its write would.
A child killed at boundary N dies *before* the N-th call; N = total + 1 kills it right after the save
returned.  :func:`dry_run` counts the boundaries of one save and :func:`kill_at` replays it to the N-th.
"""

from __future__ import annotations

import builtins
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KILLED = -signal.SIGKILL
"""``Process.exitcode`` of a child killed with SIGKILL."""

RUN_ID = "faultrun0001"
"""Run id of the checkpoints the unit kill tests write."""

PRELOAD = [
    "torch",
    "transformers.models.llama.modeling_llama",
    "transformers.modeling_utils",
    "accelerate",
    "safetensors.torch",
    "riemix.training.recipe",
    "riemix.cli",
    "tests.helpers",
    "tests.faults.killer",
]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_TMP_NAME = re.compile(r"\.(tmp|old)\.[^./]+\.\d+\.[0-9a-f]{8}")  # sibling_temp_path's host.pid.random
_MKSTEMP = re.compile(r"(/\.[^/]+?)\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_write's tempfile.mkstemp name

_context = None


def context():
    """The multiprocessing context of the children (a forkserver preloading torch and riemix)."""
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def run_child(target: Callable, *args, timeout: float = 120.0) -> tuple[int, int]:
    """Run ``target(*args)`` in a child; returns (exit code, pid). A hung child is killed and reported."""
    proc = context().Process(target=target, args=args, daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"child {target.__name__}{args!r} did not finish within {timeout} s")
    return proc.exitcode, proc.pid


def start_child(target: Callable, *args):
    """Start ``target(*args)`` in a child and return the running ``Process``."""
    proc = context().Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _quiet(log_path: str | None) -> None:
    """Send the child's stdout and stderr to ``log_path`` (else /dev/null): never into pytest's capture.
    Also limit the child to one torch thread, as the parent's tests are (tests/faults/conftest.py)."""
    import torch

    torch.set_num_threads(1)
    fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# ---------------------------------------------------------------- boundary instrumentation
class Boundaries:
    """Counts write boundaries; at the ``kill_at``-th one writes the trace to ``trace_path`` and dies."""

    def __init__(self, kill_at: int | None, trace_path: str, root: str):
        self.kill_at, self.trace_path, self.root = kill_at, trace_path, root
        self.trace: list[str] = []
        self.active = False

    def label(self, op: str, *paths) -> str | None:
        """``op(<root>/path -> ...)`` with the random parts of temporary names as ``*``; None for a call on
        an absolute path outside the test's directory (``ctypes.util.find_library`` opening /dev/null)."""
        names = []
        for p in paths:
            text = os.fsdecode(p) if isinstance(p, (str, bytes, os.PathLike)) else str(p)
            if os.path.isabs(text) and not (text + "/").startswith(self.root + "/"):
                return None
            text = text.replace(self.root, "<root>")
            names.append(_MKSTEMP.sub(r"\1.*.tmp", _TMP_NAME.sub(r".\1.*", text)))
        return f"{op}({' -> '.join(names)})"

    def hit(self, label: str | None, before_death: Callable[[], None] | None = None) -> None:
        if not self.active or label is None:
            return
        self.trace.append(label)
        if len(self.trace) == self.kill_at:
            self.active = False
            if before_death is not None:
                before_death()
            self.dump()
            os.kill(os.getpid(), signal.SIGKILL)

    def dump(self) -> None:
        self.active = False
        Path(self.trace_path).write_text(json.dumps(self.trace), encoding="utf-8")


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd{fd}"


def _truncate_half(path) -> Callable[[], None]:
    def tear() -> None:
        size = os.path.getsize(path)
        os.truncate(path, size // 2)

    return tear


def install(b: Boundaries) -> None:
    """Wrap the file-system primitives (in this disposable child process only)."""
    import safetensors.torch  # noqa: F401
    import torch

    import riemix.io.adapter as adapter_mod
    import riemix.io.fileio as fileio

    def wrap(owner, name: str, label: Callable[..., str | None]):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            text = label(*args, **kwargs)
            if text is not None:
                b.hit(text)
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)
        return wrapper

    # mkdir(exist_ok=True) of a directory already there changes nothing: not a boundary
    wrap(os, "mkdir", lambda path, *a, **k: None if os.path.isdir(path) else b.label("mkdir", path))
    wrap(os, "open", lambda path, flags, *a, **k: b.label("open", path) if flags & _WRITE_FLAGS else None)
    wrap(os, "fsync", lambda fd: b.label("fsync", _fd_path(fd if isinstance(fd, int) else fd.fileno())))
    wrap(os, "replace", lambda src, dst, **k: b.label("replace", src, dst))
    wrap(os, "rename", lambda src, dst, **k: b.label("rename", src, dst))
    wrap(os, "unlink", lambda path, **k: b.label("unlink", path))
    wrap(os, "remove", lambda path, **k: b.label("unlink", path))
    wrap(os, "rmdir", lambda path, **k: b.label("rmdir", path))
    wrap(fileio, "_exchange", lambda a, c: b.label("exchange", a, c))

    def opens_for_writing(file, mode="r", *a, **k):
        if isinstance(file, int) or not any(c in mode for c in "wax+"):
            return None
        return b.label("open", file)

    opener = wrap(io, "open", opens_for_writing)
    builtins.open = opener

    def serialiser(owner, name: str, path_of: Callable[..., Any]) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            path = path_of(*args, **kwargs)
            b.hit(b.label(name, path))
            out = real(*args, **kwargs)
            b.hit(b.label(f"torn {name}", path), before_death=_truncate_half(path))
            return out

        setattr(owner, name, wrapper)

    serialiser(adapter_mod, "save_file", lambda tensors, filename, *a, **k: filename)
    serialiser(torch, "save", lambda obj, f, *a, **k: f)


# ---------------------------------------------------------------- the saves under test (child and parent)
def adapter_cfg():
    from riemix.core.config import MoELoRAConfig

    return MoELoRAConfig(num_experts=3, top_k=2, rank=2, dropout=0.1, target_modules=["q_proj", "v_proj"])


def adapted_model(seed: int):
    """A tiny Llama with MoE-LoRA adapters initialised from ``seed`` (B non-zero, so seeds differ everywhere)."""
    import dataclasses

    import torch

    from riemix.core.tuner import add_moe_lora
    from tests.helpers import make_tiny_llama

    model = make_tiny_llama()
    torch.manual_seed(seed)
    add_moe_lora(model, dataclasses.replace(adapter_cfg(), init="small_b", init_b_std=0.02))
    return model


def mini_setup():
    """Model, optimizer and schedule of a 3-step toy training (riemix's Riemannian AdamW, linear decay)."""
    import torch

    from riemix.core.schedules import linear_schedule
    from riemix.core.tuner import add_moe_lora
    from riemix.optim import build_optimizer
    from tests.helpers import make_tiny_llama

    model = make_tiny_llama()
    torch.manual_seed(0)
    add_moe_lora(model, adapter_cfg())
    model.train()  # adapter dropout draws from the RNG: a resume must restore it
    optimizer = build_optimizer(model, "radamw", lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(0, MINI_STEPS))
    return model, optimizer, scheduler


MINI_STEPS = 3


def mini_step(model, optimizer, scheduler) -> None:
    """One step on a batch drawn from the global RNG (restored by ``load_checkpoint``)."""
    import torch

    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _scenario_save_adapter(root: Path, path: str, seed: int, exchange: bool = True) -> Callable[[], Any]:
    from riemix.io import fileio
    from riemix.io.adapter import save_adapter

    model = adapted_model(seed)
    if not exchange:  # a file system without renameat2(RENAME_EXCHANGE): publish_dir's fall-back
        fileio._exchange = lambda a, b: False
    return lambda: save_adapter(model, path)


def _scenario_save_checkpoint(root: Path, run_dir: str, step: int) -> Callable[[], Any]:
    from riemix.io.checkpoint import save_checkpoint

    model, optimizer, scheduler = mini_setup()
    for _ in range(step):
        mini_step(model, optimizer, scheduler)
    return lambda: save_checkpoint(run_dir, step, model, optimizer, scheduler, {"run_id": RUN_ID}, keep_last=1)


SCENARIOS = {"save_adapter": _scenario_save_adapter, "save_checkpoint": _scenario_save_checkpoint}


def _child_save(scenario: str, kill_at: int | None, trace_path: str, root: str, kwargs: dict) -> None:
    """Child: prepare the scenario, then run its save with the boundaries counted (and kill at one)."""
    _quiet(str(Path(trace_path).with_suffix(".log")))
    act = SCENARIOS[scenario](Path(root), **kwargs)
    b = Boundaries(kill_at, trace_path, root)
    install(b)
    b.active = True
    act()
    b.dump()
    if kill_at is not None:  # kill_at = total + 1: killed right after the save returned
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)


def dry_run(scenario: str, root: Path, trace_path: Path, **kwargs) -> list[str]:
    """The write boundaries of one uninterrupted save, in order."""
    code, _ = run_child(_child_save, scenario, None, str(trace_path), str(root), kwargs)
    assert code == 0, f"the dry run of {scenario} failed (exit {code}): {_log(trace_path)}"
    return json.loads(trace_path.read_text(encoding="utf-8"))


def kill_at(scenario: str, n: int, root: Path, trace_path: Path, **kwargs) -> tuple[list[str], int]:
    """Replay the save and SIGKILL the child before its ``n``-th boundary; returns (its trace, its pid)."""
    trace_path.unlink(missing_ok=True)
    code, pid = run_child(_child_save, scenario, n, str(trace_path), str(root), kwargs)
    assert code == KILLED, f"{scenario}: the child killed at boundary {n} exited with {code}: {_log(trace_path)}"
    return json.loads(trace_path.read_text(encoding="utf-8")), pid


def _log(trace_path: Path) -> str:
    log = Path(trace_path).with_suffix(".log")
    return log.read_text(encoding="utf-8", errors="replace")[-3000:] if log.is_file() else ""


# ---------------------------------------------------------------- training children
def child_train(cfg_dict: dict, log_path: str, die_in: str, die_step: int | None) -> None:
    """Child: ``train`` a run, SIGKILLing itself in the middle of one save.

    ``die_in="checkpoint"``: when checkpoint ``die_step`` is complete in its temporary directory, just before
    it is published; ``"adapter"``: just before the final ``<output_dir>/adapter`` is published.
    """
    _quiet(log_path)
    import riemix.io.adapter as adapter_mod
    import riemix.io.checkpoint as checkpoint_mod
    from riemix.training.config import TrainConfig
    from riemix.training.recipe import train

    out = Path(cfg_dict["output_dir"])

    def dying(real, name: str, parent: Path | None):
        def publish(tmp, final, *a, **k):
            final = Path(final)
            if final.name == name and (parent is None or final.parent == parent):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tmp, final, *a, **k)

        return publish

    if die_in == "checkpoint":
        checkpoint_mod.publish_dir = dying(checkpoint_mod.publish_dir, f"step-{die_step:06d}", None)
    else:
        adapter_mod.publish_dir = dying(adapter_mod.publish_dir, "adapter", out)
    train(TrainConfig.from_dict(cfg_dict))
    os._exit(0)  # not reached when the kill fires


def child_cli(argv: list[str], log_path: str, step_seconds: float) -> None:
    """Child: ``riemix train`` (``main(argv)``), each step slowed by ``step_seconds``; exits with its status."""
    _quiet(log_path)
    import riemix.training.recipe as recipe
    from riemix.cli import main

    real = recipe.train_step

    def slow_step(state, step):
        time.sleep(step_seconds)
        return real(state, step)

    recipe.train_step = slow_step
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def child_hold_run(cfg_dict: dict, ready_path: str, log_path: str) -> None:
    """Child: open (and lock) a run directory, say so in ``ready_path``, then wait to be killed."""
    _quiet(log_path)
    from riemix.training.config import TrainConfig
    from riemix.training.rundir import open_run

    open_run(TrainConfig.from_dict(cfg_dict))
    Path(ready_path).write_text(str(os.getpid()), encoding="utf-8")
    time.sleep(120)
    os._exit(0)
