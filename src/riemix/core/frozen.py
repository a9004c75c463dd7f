"""Frozen experts of a ``MoELoRALinear`` (continual learning): the masks and the rows the optimizers hold.

A mixin of ``riemix.core.layer.MoELoRALinear`` (kept apart so the layer module stays readable); the
model-level API is ``riemix.core.freezing`` (``freeze_experts``), the optimizer side
``RiemannianOptimizer.track_frozen`` (``riemix.optim.base``).
"""

from __future__ import annotations

import operator

import torch
from torch import nn

__all__ = ["FrozenExpertsMixin"]


class FrozenExpertsMixin:
    """Per-expert freezing for ``MoELoRALinear`` (uses its ``num_experts``, ``lora_A``, ``lora_B``,
    ``expert_scale`` and ``gate_weight``)."""

    def _check_expert_index(self, i: object) -> int:
        """``i`` as an int expert index of this layer.

        Raises:
            TypeError: ``i`` is not an integer (a bool is refused).
            ValueError: ``i`` is not in ``[0, num_experts)`` (index and E named).
        """
        if isinstance(i, bool):
            raise TypeError(f"expert index must be an int, got {i!r}")
        try:
            index = operator.index(i)
        except TypeError:
            raise TypeError(f"expert index must be an int, got {i!r}") from None
        if not 0 <= index < self.num_experts:
            raise ValueError(
                f"expert index {index} does not exist: the layer has num_experts={self.num_experts} "
                f"(valid indices 0..{self.num_experts - 1})"
            )
        return index

    def _frozen_mask(self, name: str) -> torch.Tensor:
        """The ``(E,)`` mask buffer ``name``, made ``(num_experts,)`` first if E changed (new rows unfrozen)."""
        mask = self._buffers.get(name)
        if mask is None or mask.shape != (self.num_experts,):
            new = torch.zeros(self.num_experts, dtype=torch.bool, device=self.lora_A.device)  # (E,)
            if mask is not None:
                keep = min(mask.shape[0], self.num_experts)
                new[:keep] = mask[:keep]
            self.register_buffer(name, new, persistent=False)
            mask = new
        return mask

    def _frozen_index(self, name: str) -> torch.Tensor | None:
        """Sorted int64 indices ``(F,)`` of the True entries of mask ``name`` (None when none), on its device.

        Cached on the mask's identity and version counter: a step reads it without a host sync unless the
        mask was written since (by ``freeze_expert``, a load, or any in-place write).
        """
        mask = self._frozen_mask(name)
        try:
            version: int | None = mask._version
        except RuntimeError:  # an inference tensor has no version counter: never cached
            version = None
        cache = self.__dict__.setdefault("_frozen_cache", {})
        hit = cache.get(name)
        if hit is not None and version is not None and hit[0] is mask and hit[1] == version:
            return hit[2]
        index = mask.nonzero().flatten()  # (F,)
        index = index if index.numel() else None
        cache[name] = (mask, version, index)
        return index

    @torch.no_grad()
    def freeze_expert(self, i: int, router: bool = False) -> None:
        """Hold expert ``i`` fixed: every riemix optimizer leaves its rows bit-identical until ``unfreeze_expert``.

        What is frozen is the expert's map s·(σᵢ ⊙ Bᵢ) Aᵢ: its ``lora_A`` and ``lora_B`` slices and its
        ``expert_scale`` row; with ``router=True`` also its router row (``routing="global"``: its gate
        logit).  A frozen router row keeps its parameters, not its gate: gᵢ is a softmax over all experts'
        logits.  Gradients are still computed; the optimizers (``RiemannianOptimizer.track_frozen``, done
        by ``build_optimizer``) ignore them and skip those rows' update and optimizer state.  Freezing a
        frozen expert again is a no-op; ``router=False`` never unfreezes a frozen router row.

        Args:
            i: the expert index, ``0 <= i < num_experts``.
            router: also freeze its router row / global gate entry.

        Raises:
            TypeError: ``i`` is not an int or ``router`` not a bool.
            ValueError: ``i`` is out of range (index and E named).
        """
        index = self._check_expert_index(i)
        if not isinstance(router, bool):
            raise TypeError(f"router must be a bool, got {router!r}")
        self._frozen_mask("frozen_experts")[index] = True
        if router:
            self._frozen_mask("frozen_router_rows")[index] = True

    @torch.no_grad()
    def unfreeze_expert(self, i: int) -> None:
        """Let expert ``i`` (and its router row) train again; its optimizer state resumes where it was frozen.

        Raises:
            TypeError: ``i`` is not an int.
            ValueError: ``i`` is out of range (index and E named).
        """
        index = self._check_expert_index(i)
        self._frozen_mask("frozen_experts")[index] = False
        self._frozen_mask("frozen_router_rows")[index] = False

    def frozen_parameter_rows(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, rows)`` for every parameter with frozen rows along its dim 0 (the optimizers' input).

        ``lora_A`` ``(E, r, in)``, ``lora_B`` ``(E, out, r)`` and ``expert_scale`` ``(E, out)`` with the
        frozen experts; the router weight ``(E, in)`` or ``global_gate`` ``(E,)`` with the frozen router rows.
        ``rows`` is a sorted int64 ``(F,)`` index tensor on the masks' device.  Empty when nothing is frozen
        (no host sync then).
        """
        out: list[tuple[nn.Parameter, torch.Tensor]] = []
        experts = self._frozen_index("frozen_experts")
        if experts is not None:
            out += [(p, experts) for p in (self.lora_A, self.lora_B, self.expert_scale) if p is not None]
        rows = self._frozen_index("frozen_router_rows")
        if rows is not None:
            out.append((self.gate_weight, rows))
        return out
