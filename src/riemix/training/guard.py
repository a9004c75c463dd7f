"""What stops a training run early and safely: divergence and interrupting signals.

- ``DivergenceGuard`` checks every step that the loss, the gradients and the updated weights are finite,
  and (optionally) that the smoothed loss has not run away from its best value.  A failed check raises
  ``TrainingDiverged`` *before* anything is saved, so the last checkpoint and adapter stay good.
- ``StopSignals`` turns SIGINT / SIGTERM into a request to stop at the next step boundary (the recipe then
  writes a checkpoint and raises ``TrainingInterrupted``); a second signal stops at once.

The command line maps ``TrainingDiverged`` to exit status 3 and ``TrainingInterrupted`` to 128 + the signal
number (130 for SIGINT, 143 for SIGTERM), the shell's convention.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterable

import torch

__all__ = [
    "DIVERGED_EXIT_CODE",
    "DivergenceGuard",
    "StopSignals",
    "TrainingDiverged",
    "TrainingInterrupted",
]

DIVERGED_EXIT_CODE = 3
_SPIKE_MARGIN = 1.0  # nats: a loss spike must also be this large in absolute terms (tiny losses are noisy)
_SPIKE_MIN_STEPS = 10  # steps seen before the spike rule may fire (the smoothed loss needs a history)
_SPIKE_SMOOTHING = 0.1  # weight of the newest loss in the exponential moving average


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss, gradient or weight, or its loss ran away.

    Attributes:
        step: The step (1-based) at which it was detected.
        exit_code: The command line's exit status (3).
    """

    exit_code = DIVERGED_EXIT_CODE

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(Exception):
    """A SIGINT / SIGTERM stopped the run at a step boundary, after a checkpoint was written.

    Attributes:
        signum: The signal received.
        step: Steps completed (the checkpoint's step).
        exit_code: 128 + ``signum`` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum


def _first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding NaN or inf (one device sync for all of them), or None."""
    named = [(n, t) for n, t in named if t is not None]
    if not named:
        return None
    norms = torch._foreach_norm([t.detach().float() for _, t in named])  # inf / nan propagate to the norm
    finite = torch.isfinite(torch.stack([x.to(norms[0].device) for x in norms]))
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


class DivergenceGuard:
    """Per-step checks that training has not diverged (see the module docstring).

    Args:
        loss_ratio: Stop when the smoothed loss exceeds ``loss_ratio`` × its best value and the best value
            + 1 nat (after 10 steps); None: only non-finite values stop training.
        advice: What to try, appended to every message (e.g. "lower the learning rate (now 1e+06)").
    """

    def __init__(self, loss_ratio: float | None, advice: str):
        self.loss_ratio, self.advice = loss_ratio, advice
        self.smoothed: float | None = None
        self.best: float | None = None
        self.seen = 0

    def _fail(self, what: str, step: int) -> None:
        raise TrainingDiverged(f"training diverged at step {step}: {what}; nothing was saved for this step; "
                               f"{self.advice}", step)  # fmt: skip

    def check_loss(self, loss: float, step: int) -> None:
        """Refuse a non-finite loss, or a smoothed loss that ran away (``loss_ratio``)."""
        if not math.isfinite(loss):
            self._fail(f"the loss is {loss}", step)
        self.seen += 1
        a = _SPIKE_SMOOTHING
        self.smoothed = loss if self.smoothed is None else (1 - a) * self.smoothed + a * loss
        self.best = self.smoothed if self.best is None else min(self.best, self.smoothed)
        if self.loss_ratio is None or self.seen < _SPIKE_MIN_STEPS:
            return
        if self.smoothed > self.loss_ratio * self.best and self.smoothed > self.best + _SPIKE_MARGIN:
            self._fail(
                f"the smoothed loss rose to {self.smoothed:.4g}, over {self.loss_ratio:g}× its best "
                f"{self.best:.4g} (divergence_loss_ratio; null switches this rule off)",
                step,
            )

    def check_gradients(self, params: Iterable[tuple[str, torch.nn.Parameter]], step: int) -> None:
        """Refuse a NaN / inf gradient before the optimizer applies it."""
        bad = _first_non_finite((n, p.grad) for n, p in params)
        if bad is not None:
            self._fail(f"the gradient of {bad} holds NaN or inf", step)

    def check_weights(self, params: Iterable[tuple[str, torch.nn.Parameter]], step: int) -> None:
        """Refuse NaN / inf weights after an update (an overflowing step)."""
        bad = _first_non_finite(params)
        if bad is not None:
            self._fail(f"the update made {bad} NaN or inf", step)


class StopSignals:
    """Context manager: SIGINT / SIGTERM set ``received`` instead of killing the process.

    The training loop polls ``received`` at step boundaries.  A second signal while the first is pending
    restores the previous handler and delivers it (Ctrl-C twice stops at once).  Outside the main thread
    (where Python cannot install handlers) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second one: give up waiting for the step boundary
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    @property
    def name(self) -> str:
        """The received signal's name (``SIGINT``), or ``""``."""
        return signal.Signals(self.received).name if self.received is not None else ""
