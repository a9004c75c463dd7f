"""Machinery shared by the Riemannian optimizers: validation, LoRA pair registry, clipping, two-phase step.

A step (``RiemannianOptimizer.step``) runs in this order:

1. per group: take the grads of the params that have one, clip them out of place (``max_grad_norm``) and
   pass them through the subclass hook ``_prepare_grads`` (SGD's coupled weight decay);
2. precondition the paired factors (``riemix.optim.precondition``) from the pre-step parameters; on CPU
   each factor's product is left to the update (a ``DeferredGrad`` in the grads it receives), which
   writes it where it reads it;
3. per group: the subclass's elementwise update (``_update_group``).

Frozen rows (continual learning, ``RiemannianOptimizer.track_frozen``): a stacked parameter's rows along
dim 0 that a tracked source (a ``MoELoRALinear``: its frozen experts and router rows) holds fixed.  Their
gradient rows are zeroed in the working grads before clipping (so they neither count in a group's grad norm
nor reach the preconditioner, which is per expert anyway), and the rows of the parameter and of every
optimizer-state tensor of its shape (AdamW's moments, SGD's momentum buffer) are copied aside before the
update and written back after it: exact (bit-identical, whatever the kernel, weight decay or momentum did to
those rows) and cheap (it touches the frozen rows only).  State rows created by the step stay zero.  The
per-tensor step count of AdamW still advances, so after unfreezing the expert resumes from the moments it
had when frozen, with the bias correction of the current step count.

With ``reference_compat``, AdamW defers B: its preconditioner is built and applied after A was updated.
``.grad`` is never modified. The optimizer keeps the preconditioner's plan (its Gram and inverse buffers,
and the buffers of preconditioned gradients the update asks for) between steps; it is not part of the
state_dict.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from riemix.optim.precondition import DeferredGrad, Job, precondition_grads_

__all__ = ["RiemannianOptimizer", "by_device_dtype", "check_option", "clip_grads", "validate_options"]


def check_option(ok: bool, name: str, value: Any) -> None:
    """Raise ``ValueError("Invalid {name}: {value}")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"Invalid {name}: {value}")


_RULES: dict[str, Callable[[Any], bool]] = {
    "lr": lambda v: v >= 0.0,  # comparisons also reject NaN
    "momentum": lambda v: v >= 0.0,
    "weight_decay": lambda v: v >= 0.0,
    "reg": lambda v: v >= 0.0,
    "eps": lambda v: v is None or v >= 0.0,
    "dampening": lambda v: 0.0 <= v <= 1.0,
    "betas": lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v),
    "max_grad_norm": lambda v: v is None or 0.0 < v < math.inf,
    "precondition": lambda v: isinstance(v, bool),
    "reference_compat": lambda v: isinstance(v, bool),
    "nesterov": lambda v: isinstance(v, bool),
    "fused": lambda v: v is None or isinstance(v, bool),
}


def validate_options(opts: dict[str, Any]) -> None:
    """Validate the hyperparameters present in ``opts`` (constructor defaults or one param group).

    Raises:
        ValueError: ``"Invalid {name}: {value}"`` for the first bad value, or a message naming the
            conflicting options (Nesterov without momentum / with dampening, fused with reference_compat).
    """
    for key, ok in _RULES.items():
        if key in opts:
            check_option(ok(opts[key]), key, opts[key])
    if opts.get("nesterov") and (opts["momentum"] <= 0 or opts["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if opts.get("fused") and opts.get("reference_compat"):
        raise ValueError("Invalid fused: True is not supported with reference_compat=True")


def by_device_dtype(params: list[Tensor], grads: list) -> list[tuple[list[Tensor], list]]:
    """Split aligned ``params``/``grads`` lists into buckets of one (device, dtype) each, in first-seen order."""
    buckets: dict[tuple, tuple[list[Tensor], list]] = defaultdict(lambda: ([], []))
    for p, g in zip(params, grads, strict=True):
        ps, gs = buckets[(p.device, p.dtype)]
        ps.append(p)
        gs.append(g)
    return list(buckets.values())


def clip_grads(grads: list[Tensor], max_norm: float) -> list[Tensor]:
    """Out-of-place equivalent of ``torch.nn.utils.clip_grad_norm_`` (L2) over ``grads``."""
    index: dict[tuple, list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        index[(g.device, g.dtype)].append(i)
    norms = [n for idx in index.values() for n in torch._foreach_norm([grads[i] for i in idx], 2.0)]
    first = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), 2.0)  # ()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # ()
    out = list(grads)
    for (device, _), idx in index.items():
        for i, g in zip(idx, torch._foreach_mul([grads[i] for i in idx], coef.to(device)), strict=True):
            out[i] = g
    return out


def _register_pairs(lora_pairs: Iterable, owned: set[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Validate ``lora_pairs`` against the optimizer's parameters ``owned``; the (A, B) list.

    Raises:
        ValueError: A pair is not an (A, B) tuple, names a tensor the optimizer does not own or one already
            paired, or its factors disagree in dims, number of experts, rank, dtype or device.
    """
    pairs: list[tuple[Tensor, Tensor]] = []
    seen: set[Tensor] = set()
    for i, pair in enumerate(lora_pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"lora_pairs[{i}] must be an (A, B) tuple, got {type(pair).__name__}")
        a, b = pair
        for label, t in (("A", a), ("B", b)):
            if not isinstance(t, Tensor) or t not in owned:
                raise ValueError(f"lora_pairs[{i}]: {label} is not among the optimizer's parameters")
            if t in seen:
                raise ValueError(f"lora_pairs[{i}]: {label} appears in more than one pair")
            seen.add(t)
        if a.dim() not in (2, 3) or b.dim() != a.dim():
            shapes = f"{tuple(a.shape)} and {tuple(b.shape)}"
            raise ValueError(f"lora_pairs[{i}]: A and B must both be 2-D or both 3-D, got {shapes}")
        (ea, eb), ra, rb = (a.shape[0], b.shape[0]) if a.dim() == 3 else (1, 1), a.shape[-2], b.shape[-1]
        if ea != eb:
            raise ValueError(f"lora_pairs[{i}]: number of experts differs (A has {ea}, B has {eb})")
        if ra != rb:
            raise ValueError(f"lora_pairs[{i}]: rank mismatch (A has r={ra}, B has r={rb})")
        if a.dtype != b.dtype or a.device != b.device:
            raise ValueError(f"lora_pairs[{i}]: A and B must share dtype and device")
        pairs.append((a, b))
    return pairs


def _row_state(value: Any, param: Tensor) -> bool:
    """Whether an optimizer-state entry holds one value per element of ``param`` (moments, momentum)."""
    return isinstance(value, Tensor) and value.shape == param.shape


class RiemannianOptimizer(Optimizer):
    """Base class: pair registry, grad clipping, preconditioning of paired factors, two-phase update.

    Subclasses implement ``_update_group`` (the elementwise update of one group's params) and may override
    ``_prepare_grads``. Every group has ``reg``, ``precondition``, ``reference_compat`` and ``max_grad_norm``.

    Args:
        params: Iterable of parameters or param-group dicts.
        defaults: The subclass's hyperparameter defaults (validated here, and again per added group).
        lora_pairs: Iterable of (A, B) parameters; A is (E, r, in) or (r, in), B (E, out, r) or (out, r).
    """

    _defer_b_in_compat = False  # AdamW's reference code builds B's preconditioner from the updated A

    def __init__(self, params: Any, defaults: dict[str, Any], lora_pairs: Iterable) -> None:
        validate_options(defaults)
        super().__init__(params, defaults)
        owned = {p for group in self.param_groups for p in group["params"]}
        self._pairs: list[tuple[Tensor, Tensor]] = _register_pairs(lora_pairs, owned)
        self._plans: dict[tuple, Any] = {}  # preconditioner plans and their buffers; not in state_dict
        self._scratch: dict[tuple, Tensor] = {}  # the update's own reusable buffers; not in state_dict
        self._frozen_sources: list[Any] = []  # objects with frozen_parameter_rows() (track_frozen)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_pairs": self._pairs, "_frozen_sources": self._frozen_sources}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_pairs", [])
        self.__dict__.setdefault("_frozen_sources", [])
        self._plans, self._scratch = {}, {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        validate_options({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def track_frozen(self, *sources: Any) -> None:
        """Hold the frozen rows of ``sources`` fixed in every later ``step`` (see the module docstring).

        A source has a ``frozen_parameter_rows()`` method returning ``(parameter, rows)`` pairs, ``rows`` an
        int64 index tensor along the parameter's dim 0 (``MoELoRALinear``: its frozen experts and router
        rows).  It is read at every step, so freezing or unfreezing later needs no new optimizer; pairs whose
        parameter the optimizer does not own are ignored.  ``build_optimizer`` tracks every MoE-LoRA layer.

        Args:
            *sources: the objects to track (each tracked once however often it is passed).

        Raises:
            TypeError: a source has no ``frozen_parameter_rows`` method (its type named).
        """
        for source in sources:
            if not callable(getattr(source, "frozen_parameter_rows", None)):
                raise TypeError(
                    f"track_frozen needs objects with a frozen_parameter_rows() method (e.g. a MoELoRALinear), "
                    f"got {type(source).__name__}"
                )
        known = {id(s) for s in self._frozen_sources}
        for source in sources:
            if id(source) not in known:
                known.add(id(source))
                self._frozen_sources.append(source)

    def _frozen_rows(self) -> dict[Tensor, Tensor]:
        """param -> its frozen row indices ``(F,)`` on its device, for owned params with a grad and frozen rows."""
        rows: dict[Tensor, Tensor] = {}
        for source in self._frozen_sources:
            for p, index in source.frozen_parameter_rows():
                if p.grad is None:
                    continue
                index = index.to(p.device)
                rows[p] = index if p not in rows else torch.unique(torch.cat([rows[p], index]))  # (F,)
        if rows:
            owned = {p for group in self.param_groups for p in group["params"]}
            rows = {p: index for p, index in rows.items() if p in owned}
        return rows

    def _save_frozen(self, frozen: dict[Tensor, Tensor]) -> list[tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]]:
        """``(param, rows, its frozen rows, {state key: their rows})`` before the update (copies)."""
        saved = []
        for p, index in frozen.items():
            state = self.state.get(p, {})
            rows = {k: v.index_select(0, index) for k, v in state.items() if _row_state(v, p)}
            saved.append((p, index, p.index_select(0, index), rows))
        return saved

    def _restore_frozen(self, saved: list[tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]]) -> None:
        """Write the saved rows back into the params and their state (state created by this step: zeros)."""
        for p, index, value, rows in saved:
            p.index_copy_(0, index, value)
            for key, v in self.state.get(p, {}).items():
                if _row_state(v, p) and key in rows:
                    v.index_copy_(0, index, rows[key])
                elif _row_state(v, p):  # created by this step: the frozen rows keep the initial zeros
                    v.index_fill_(0, index, 0)

    def _prepare_grads(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Hook applied to the (clipped) raw grads before preconditioning."""
        return grads

    def _update_group(self, group: dict, params: list[Tensor], grads: list[Tensor | DeferredGrad]) -> None:
        """The elementwise update of ``params``; a ``DeferredGrad`` grad is computed by reading it."""
        raise NotImplementedError

    # Under torch.compile the step runs eagerly: its plan cache, host-side checks and torch's fused AdamW
    # kernel do not trace (a compiled step failed in functionalization; benchmarks/compile_check.py).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure`` (or None).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        frozen = self._frozen_rows() if self._frozen_sources else {}
        grads = self._working_grads(frozen)
        saved = self._save_frozen(frozen) if frozen else None
        now, later = self._jobs(grads)
        precondition_grads_(now, grads, self._plans, defer=True)
        later_params = {job.param for job in later}
        self._apply(grads, (lambda p: p not in later_params) if later else None)
        if later:  # reference_compat: B's preconditioner from the already-updated A
            precondition_grads_(later, grads, self._plans, defer=True)
            self._apply(grads, lambda p: p in later_params)
        if saved:
            self._restore_frozen(saved)
        return loss

    def _working_grads(self, frozen: dict[Tensor, Tensor] | None = None) -> dict[Tensor, Tensor | DeferredGrad]:
        """param -> its clipped, prepared grad, for every param that has one (``p.grad`` is never mutated).

        The rows ``frozen[p]`` of a grad are zeroed (out of place) before clipping.
        """
        grads: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            gs = [p.grad for p in params]
            if any(g.is_sparse for g in gs):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if frozen:
                gs = [g.index_fill(0, frozen[p], 0) if p in frozen else g for p, g in zip(params, gs, strict=True)]
            if group["max_grad_norm"] is not None:
                gs = clip_grads(gs, group["max_grad_norm"])
            grads.update(zip(params, self._prepare_grads(group, params, gs), strict=True))
        return grads

    def _jobs(self, grads: dict[Tensor, Tensor | DeferredGrad]) -> tuple[list[Job], list[Job]]:
        """The factors to precondition now and, for deferred B factors (reference_compat), after the update.

        ``reg`` comes from the A factor's group; whether a factor is preconditioned (and deferred) from its
        own group.
        """
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        now: list[Job] = []
        later: list[Job] = []
        for a, b in self._pairs:
            reg = group_of[a]["reg"]
            if a in grads and group_of[a]["precondition"]:
                now.append(Job(a, b, True, reg))
            if b in grads and group_of[b]["precondition"]:
                defer = self._defer_b_in_compat and group_of[b]["reference_compat"]
                (later if defer else now).append(Job(b, a, False, reg))
        return now, later

    def _apply(self, grads: dict[Tensor, Tensor | DeferredGrad], keep: Callable[[Tensor], bool] | None) -> None:
        """``_update_group`` on every group's params that have a grad (and pass ``keep``, when given)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p in grads and (keep is None or keep(p))]
            if params:
                self._update_group(group, params, [grads[p] for p in params])
