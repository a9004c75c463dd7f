"""Growing a layer by one expert without changing what it computes: ``grow_layer`` (``MoELoRALinear.add_expert``).

The stacked parameters are replaced by new ones one expert larger (E → E+1), and wider when the new expert's
rank r exceeds the stacked rank R (R → max(R, r)); the old values are copied into the leading corner and
every new slot is zero, so

- the old experts keep their values bit for bit, and their rank padding (rows ≥ rᵢ of Aᵢ, columns of Bᵢ)
  stays zero (see ``MoELoRALinear.expert_ranks``);
- the new expert has B = 0, so it adds nothing to the output, and an A drawn like the layer's initialisation
  (``init_info``: Kaiming-uniform for ``zero_b``/``small_b``, N(0, 1/r²) for ``gaussian``, orthonormal rows for
  ``orthogonal``), so its B receives gradient as soon as it has a gate;
- its router row is the mean of the existing rows: its logit is the mean of the old logits on every token,
  a typical expert's share under dense routing (maturity routing, ``riemix.core.maturity``), from which the
  router learns where it should win.  Under top-k routing it enters a token's top-k only where the mean logit
  beats the k-th largest (never with top-1: the mean never exceeds the maximum and ties go to the lower
  index), and where it does not the output is unchanged: the other gates are those of before.  Where it
  does enter (top-k with k > 1, dense routing), the old experts' gates are renormalised over one more expert
  and the output changes by that renormalisation, not by the new expert (B = 0): no choice of router row can
  avoid it while letting the new expert have a gate;
- with ``routing="global"`` (gᵢ = E·softmax(w/T)ᵢ) the new logit is T·(logsumexp(w/T) − log E): the old
  gates keep their values (up to rounding: (E+1)·eʷⁱ/(Z + Z/E) = E·eʷⁱ/Z) and the new expert gets the mean
  gate 1;
- its expert-scale row (``expert_scales``) is 1.

``riemix.optim.growth.grow_experts`` grows a whole model and carries an optimizer's state along.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from riemix.core.init import orthogonal_rows

__all__ = ["grow_layer", "pad_corner"]


def pad_corner(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A zero tensor of ``shape`` (``t``'s dtype and device) with ``t`` copied into its leading corner.

    Args:
        t: the tensor to pad; every dim at most the corresponding one of ``shape``.
        shape: the new shape (same number of dims).

    Returns:
        The padded copy.
    """
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _check_rank(rank: object) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"add_expert: rank must be an int >= 1 or None, got {rank!r}")
    return rank


def _new_a(layer, rank: int) -> torch.Tensor:
    """``(rank, in)`` A of a new expert, drawn like the layer's initialisation (fp64 drawn for orthogonal)."""
    a = layer.lora_A
    info = layer.init_info
    if info in ("orthogonal", "joint", "per_expert"):
        return orthogonal_rows(1, rank, layer.in_features)[0][0].to(device=a.device, dtype=a.dtype)  # (r, in)
    new = torch.empty(rank, layer.in_features, dtype=a.dtype, device=a.device)  # (r, in)
    if info == "gaussian":
        return nn.init.normal_(new, std=1.0 / rank)
    return nn.init.kaiming_uniform_(new, a=math.sqrt(5))  # zero_b, small_b: fan_in = in per row


def _new_gate_logit(layer) -> torch.Tensor:
    """``(1,)`` global-gate logit that leaves the old gates E·softmax(w/T) unchanged (the new gate is 1)."""
    w = layer.global_gate.detach()  # (E,)
    temp = layer.router_temperature
    work = w.double()
    logit = temp * (torch.logsumexp(work / temp, dim=0) - math.log(w.shape[0]))  # ()
    return logit.reshape(1).to(w.dtype)


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> nn.Parameter:
    """Set ``module.<name>`` to a new Parameter holding ``value`` (old ``requires_grad``, padded ``.grad``)."""
    old = getattr(module, name)
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = pad_corner(old.grad, tuple(value.shape))
    setattr(module, name, new)
    return new


@torch.no_grad()
def grow_layer(layer, rank: int | None = None) -> int:
    """Add one expert to a ``MoELoRALinear`` in place (see the module docstring); its index.

    Args:
        layer: the layer.
        rank: the new expert's rank (None: the rank of expert 0, the rank the layer was created with).

    Returns:
        The new expert's index, the old ``num_experts``.

    Raises:
        ValueError: a bad ``rank``, or a PiSSA layer (its base weight holds a residual built for the
            experts it was created with).
    """
    if layer.pissa_down is not None:
        raise ValueError(
            "add_expert: this layer was initialised with init='pissa' (its base weight is the residual of the "
            "experts it was created with); growing it is not supported"
        )
    r_new = layer.expert_ranks[0] if rank is None else _check_rank(rank)
    e, r_old = layer.num_experts, layer.rank
    r_max = max(r_old, r_new)
    a = pad_corner(layer.lora_A.detach(), (e + 1, r_max, layer.in_features))  # (E+1, R', in)
    a[e, :r_new] = _new_a(layer, r_new)
    b = pad_corner(layer.lora_B.detach(), (e + 1, layer.out_features, r_max))  # (E+1, out, R'), new B = 0
    _replace(layer, "lora_A", a)
    _replace(layer, "lora_B", b)
    if layer.router is not None:
        w = layer.router.weight.detach()  # (E, in)
        _replace(layer.router, "weight", torch.cat([w, w.mean(0, keepdim=True)]))  # (E+1, in)
        layer.router.out_features = e + 1
    else:
        _replace(layer, "global_gate", torch.cat([layer.global_gate.detach(), _new_gate_logit(layer)]))  # (E+1,)
    if layer.expert_scale is not None:
        scale = layer.expert_scale.detach()  # (E, out)
        _replace(layer, "expert_scale", torch.cat([scale, torch.ones_like(scale[:1])]))  # (E+1, out)
    layer._expert_added(r_new)
    return e
