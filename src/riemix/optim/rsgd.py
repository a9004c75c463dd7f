"""``RiemannianSGD``: SGD with Riemannian (scaled-gradient) preconditioning of LoRA factor pairs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from riemix.optim.base import RiemannianOptimizer, by_device_dtype
from riemix.optim.precondition import DeferredGrad, resolve

__all__ = ["RiemannianSGD"]


class RiemannianSGD(RiemannianOptimizer):
    """SGD with Riemannian (scaled-gradient) preconditioning of LoRA factor pairs.

    Semantics follow ``torch.optim.SGD``: weight decay is *coupled* (``wd * p`` is added to the grad)
    and, for paired factors, it is added *before* preconditioning, so the decay term is scaled like
    the gradient (the gradient of ``loss + wd/2 |p|^2`` is what gets preconditioned). With
    ``precondition=False`` the update is step-for-step identical to ``torch.optim.SGD``.

    Args:
        params: Iterable of parameters or param-group dicts.
        lr: Learning rate.
        momentum: Momentum factor.
        dampening: Dampening for momentum, in [0, 1].
        weight_decay: Coupled L2 penalty.
        nesterov: Enable Nesterov momentum (requires momentum > 0 and zero dampening).
        reg: Ridge term delta added to the r x r Gram matrices (taken from the A factor's group).
        precondition: Precondition paired factors; per group, so a group can opt out.
        reference_compat: Mimic the reference ``SGDr``: weight decay is decoupled
            (``p <- p * (1 - lr * wd)`` before the step). Both preconditioners still use the
            pre-step factors, as in the reference.
        max_grad_norm: If set, clip the total L2 grad norm of the group before the update.
        lora_pairs: Iterable of (A, B) parameters; A is (E, r, in) or (r, in), B (E, out, r) or (out, r).
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        reg: float = 1e-6,
        precondition: bool = True,
        reference_compat: bool = False,
        max_grad_norm: float | None = None,
        lora_pairs: Iterable = (),
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            reg=reg, precondition=precondition, reference_compat=reference_compat,
            max_grad_norm=max_grad_norm,
        )  # fmt: skip
        super().__init__(params, defaults, lora_pairs)

    def _prepare_grads(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Coupled weight decay: ``g + wd * p``, before preconditioning (not in reference_compat)."""
        wd = group["weight_decay"]
        if wd != 0 and not group["reference_compat"]:
            return list(torch._foreach_add(grads, params, alpha=wd))
        return grads

    def _update_group(self, group: dict, params: list[Tensor], grads: list[Tensor | DeferredGrad]) -> None:
        """``torch.optim.SGD``'s update (momentum, dampening, Nesterov) on preconditioned grads.

        A deferred preconditioned gradient goes straight into the momentum buffer (or, without momentum,
        into the parameter) in the product that computes it: ``buf <- momentum·buf + (1 - dampening)·grad``
        is one ``baddbmm`` per factor instead of a product and two passes over the buffer.
        """
        lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
        wd = group["weight_decay"]
        for ps, gs in by_device_dtype(params, grads):
            if wd != 0 and group["reference_compat"]:
                torch._foreach_mul_(ps, 1.0 - lr * wd)
            if momentum == 0:
                rest = [(p, g) for p, g in zip(ps, gs, strict=True) if not _accumulated(g, p, 1.0, -lr)]
                if rest:
                    torch._foreach_add_([p for p, _ in rest], [resolve(g) for _, g in rest], alpha=-lr)
                continue
            if group["nesterov"]:  # the step needs the gradient itself
                gs = [resolve(g) for g in gs]
            bufs = [self.state[p].get("momentum_buffer") for p in ps]
            old = []  # (buf, grad) pairs updated with multi-tensor ops
            for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
                if bufs[i] is None:  # first step of this param: the buffer starts as the grad
                    buf = torch.empty_like(p, memory_format=torch.contiguous_format)
                    bufs[i] = self.state[p]["momentum_buffer"] = (
                        g.into(buf) if isinstance(g, DeferredGrad) else buf.copy_(g)
                    )
                elif not _accumulated(g, bufs[i], momentum, 1.0 - dampening):
                    old.append((bufs[i], resolve(g)))
            if old:  # buf <- momentum * buf + (1 - dampening) * g, in two multi-tensor ops
                torch._foreach_mul_([b for b, _ in old], momentum)
                torch._foreach_add_([b for b, _ in old], [g for _, g in old], alpha=1.0 - dampening)
            gs = torch._foreach_add(gs, bufs, alpha=momentum) if group["nesterov"] else bufs
            torch._foreach_add_(ps, gs, alpha=-lr)


def _accumulated(g: Tensor | DeferredGrad, target: Tensor, beta: float, alpha: float) -> bool:
    """``target <- beta·target + alpha·g`` when ``g`` is deferred and ``target`` contiguous; whether it ran."""
    if isinstance(g, DeferredGrad) and target.is_contiguous():
        g.accumulate_(target, beta, alpha)
        return True
    return False
