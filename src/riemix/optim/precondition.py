"""Riemannian preconditioning of LoRA factor gradients: the readable reference and the batched fast path.

For every expert ``e`` of an (A, B) pair, A_e ``(r, in)`` and B_e ``(out, r)``, both preconditioners are
built from the pre-step factors (Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning
Foundation Models", ICML 2024)::

    grad_A_e <- (B_eᵀ B_e + reg·I)⁻¹ grad_A_e
    grad_B_e <- grad_B_e (A_e A_eᵀ + reg·I)⁻¹

The r x r ridge Gram must pass a Cholesky factorization (``_ridge_inverse``): when it fails (the Gram is not
numerically positive definite, e.g. ``reg=0`` with a zero factor) or the inverse is not finite, that expert
gets its plain gradient instead of NaN. Half-precision factors are solved in fp32.

``precondition_reference`` is that formula, one expert at a time. ``precondition_grads_`` computes the same
for many factors at once with a ``_Plan``: built once for a list of jobs and kept between steps (rebuilt when
a factor's shape, dtype or device changes), it holds every buffer and view a step needs, so a step is

1. Grams: one product per factor into a slice of its bucket's Gram buffer (factors whose r x r systems
   can be solved together, same rank, compute dtype and device, form a bucket);
2. solve: every ridge Gram of a bucket inverted in one batched call (``_ridge_inverse``);
3. apply: one product per factor, from the left for A and from the right for B. On accelerators the
   products of same-shape factors run stacked, at once. On CPU each factor's product can be left to the
   update as a ``DeferredGrad``, which writes it where the update reads it (a cache-sized chunk buffer, or
   straight into SGD's momentum buffer): the preconditioned gradient then never makes a round trip
   through memory.

Multiplying by the inverse is measured ~4x faster on CPU than ``torch.cholesky_solve`` with the gradient
as right-hand side (the r x in systems are tiny; a batched solve is much slower than a batched matmul).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DeferredGrad", "Job", "precondition_grads_", "precondition_reference", "resolve"]

_HALF = (torch.float16, torch.bfloat16)


class Job(NamedTuple):
    """One factor whose gradient gets preconditioned."""

    param: Tensor  # the factor: A (E, r, in) or (r, in); B (E, out, r) or (out, r)
    partner: Tensor  # the other factor of its pair, whose Gram preconditions ``param``
    is_a: bool  # True: param is A (inverse on the left); False: param is B (inverse on the right)
    reg: float  # ridge term added to the Gram's diagonal


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the r x r systems are built and solved in: fp32 for half precision, else ``dtype``."""
    return torch.float32 if dtype in _HALF else dtype


def _ridge_inverse(gram: Tensor, reg: Tensor | float, out: Tensor | None = None) -> Tensor:
    """``(gram + reg·I)⁻¹`` of (K, r, r) symmetric Grams; one whose Cholesky factorization fails gives I.

    The factorization decides: a ridge Gram that is not numerically positive definite (e.g. ``reg=0`` with a
    zero factor), or whose inverse is not finite, is replaced by the identity, so that expert gets its plain
    gradient (as in the reference code's ``except`` branch) instead of NaN or a huge step. The inverse itself
    comes from ``torch.linalg.inv_ex`` (~2x faster than ``torch.cholesky_inverse`` for 4800 4 x 4 matrices
    on CPU, measured).

    Args:
        gram: The Grams, (K, r, r); ``reg`` is added to their diagonal in place.
        reg: The ridge term: a float, or a (K, 1) tensor with one value per matrix.
        out: Optional (K, r, r) buffer for the result.

    Returns:
        The (K, r, r) inverses (``out`` when given).
    """
    gram.diagonal(dim1=-2, dim2=-1).add_(reg)
    info = torch.linalg.cholesky_ex(gram).info  # (K,): 0 where the factorization succeeded
    inv = torch.linalg.inv_ex(gram, out=(torch.empty_like(gram) if out is None else out, torch.empty_like(info)))[0]
    if gram.device.type == "cpu" and not info.any() and inv.sum().isfinite():
        return inv  # the common case; one check (a host sync, hence CPU only) instead of a masked copy
    ok = (info == 0) & inv.flatten(1).sum(1).isfinite()  # (K,); NaN or inf anywhere gives a non-finite sum
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return inv.copy_(torch.where(ok[:, None, None], inv, eye))


def precondition_reference(grad: Tensor, other: Tensor, is_a: bool, reg: float) -> Tensor:
    """Preconditioned gradient of one LoRA factor, one expert at a time (the readable formula).

    ``(BᵀB + reg·I)⁻¹ grad_A`` when ``is_a``, else ``grad_B (AAᵀ + reg·I)⁻¹``, per expert, solved in fp32
    for half precision; a Gram whose Cholesky factorization fails gives the plain gradient. Slow: for tests
    and reading.

    Args:
        grad: The factor's gradient: ``(E, r, in)`` or ``(r, in)`` for A, ``(E, out, r)`` or ``(out, r)`` for B.
        other: The pair's other factor (B when ``is_a``, else A), with as many dims as ``grad``.
        is_a: Whether ``grad`` belongs to A.
        reg: Ridge term added to the Gram's diagonal.

    Returns:
        The preconditioned gradient, with the shape and dtype of ``grad``.
    """
    cdtype = _compute_dtype(grad.dtype)
    g3 = grad.reshape(-1, *grad.shape[-2:]).to(cdtype)  # (E, r, in) for A, (E, out, r) for B
    o3 = other.reshape(-1, *other.shape[-2:]).to(cdtype)  # (E, out, r) for A, (E, r, in) for B
    out = torch.empty_like(g3)
    for e in range(g3.shape[0]):
        gram = o3[e].T @ o3[e] if is_a else o3[e] @ o3[e].T  # (r, r)
        inv = _ridge_inverse(gram[None], reg)[0]  # (r, r); the identity if the factorization failed
        out[e] = inv @ g3[e] if is_a else g3[e] @ inv
    return out.reshape(grad.shape).to(grad.dtype)


# ---------------------------------------------------------------------------------------------------------
# The batched fast path
# ---------------------------------------------------------------------------------------------------------

_KRON_WIDTH = 16  # CPU: a tall (rows, r) operand is multiplied as (rows/q, q·r) blocks with q·r = 16


def _stack_matmuls(device: torch.device) -> bool:
    """Stack same-shape factors into one matmul (accelerators) or multiply per factor (CPU, measured faster)."""
    return device.type != "cpu"


def _kron_rows(r: int, rows: int, device: torch.device) -> int:
    """q: how many rows of a tall (rows, r) operand one CPU product row takes (q·r <= 16, q divides rows).

    ``X M`` for X (rows, r) equals ``X' (I_q ⊗ M)`` with X' the free (rows/q, q·r) view of X, and ``XᵀX`` is
    the sum of the q diagonal r x r blocks of ``X'ᵀX'``. MKL runs these 16-wide products ~2x faster than the
    4-wide originals at r = 4 (measured on a 2-core AMD EPYC). 1 on accelerators and for r >= 16.
    """
    if _stack_matmuls(device):
        return 1
    q = max(1, _KRON_WIDTH // r)
    while rows % q:
        q -= 1
    return q


def _as3d(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(E, ., .) version of a factor or grad in ``dtype``; a 2-D one is a single expert (E=1)."""
    t = t if t.dim() == 3 else t.unsqueeze(0)
    return t if t.dtype == dtype else t.to(dtype)


class DeferredGrad:
    """The preconditioned gradient of one CPU factor, computed by whoever reads it (one product).

    ``inv @ grad`` for A, ``grad @ inv`` for B, per expert. ``value()`` writes it into the factor's own
    buffer (allocated on first use, reused across steps); ``into(out)`` into another buffer (e.g. a
    cache-sized chunk buffer of the fused AdamW update); ``accumulate_(target, beta, alpha)`` adds it to a
    momentum buffer or the parameter in the same product (``target <- beta·target + alpha·grad``). Only
    handed out when the factor's dtype is the compute dtype, so every target has the factor's dtype.
    """

    __slots__ = ("param", "grad", "is_a", "inv", "shape", "key", "_buffer")

    def __init__(self, param: Tensor, is_a: bool, inv: Tensor, kron: Tensor | None) -> None:
        self.param = param  # the factor (shape and dtype of the result)
        self.grad: Tensor | None = None  # the plain (clipped, prepared) gradient, set every step
        self.is_a = is_a
        self.inv = inv if kron is None else kron  # (E, r, r) view of the bucket's inverses, or I_q ⊗ inv
        e, rows, cols = (1, *param.shape) if param.dim() == 2 else param.shape
        width = self.inv.shape[-1]  # r, or q·r: B's (E, out, r) grad runs as its (E, out/q, q·r) view
        self.shape = (e, rows, cols) if is_a else (e, rows * cols // width, width)
        self.key = (param.shape, param.dtype, param.device)  # buffers of this key can hold the result
        self._buffer: Tensor | None = None

    def _product(self, out: Tensor, beta: float = 0.0, alpha: float = 1.0) -> Tensor:
        g = self.grad.reshape(self.shape)  # a view, except for a strided B grad with q > 1
        g = g if g.dtype == self.inv.dtype else g.to(self.inv.dtype)
        lhs, rhs, o = (self.inv, g, out.view(self.shape)) if self.is_a else (g, self.inv, out.view(self.shape))
        if beta == 0.0 and alpha == 1.0:
            torch.bmm(lhs, rhs, out=o)
        else:
            o.baddbmm_(lhs, rhs, beta=beta, alpha=alpha)
        return out

    def into(self, out: Tensor) -> Tensor:
        """Write the preconditioned gradient into ``out`` (contiguous, the factor's shape and dtype); returns it."""
        return self._product(out)

    def accumulate_(self, target: Tensor, beta: float, alpha: float) -> Tensor:
        """``target <- beta·target + alpha·grad`` in one product (``target`` contiguous, the factor's shape)."""
        return self._product(target, beta, alpha)

    def value(self) -> Tensor:
        """The preconditioned gradient in the factor's dtype (a buffer the next step overwrites)."""
        if self._buffer is None:
            self._buffer = torch.empty(self.param.shape, dtype=self.inv.dtype, device=self.param.device)
        out = self._product(self._buffer)
        return out if out.dtype == self.param.dtype else out.to(self.param.dtype)


def resolve(g: Tensor | DeferredGrad) -> Tensor:
    """A working gradient as a tensor: ``g`` itself, or the value of a deferred one."""
    return g.value() if isinstance(g, DeferredGrad) else g


class _Block:
    """Jobs of one bucket with identical shapes, dtype and reg, with the buffers their products use.

    ``gram`` and ``inv`` are (N, E, r, r) views of the bucket's buffers. A-jobs with ``q > 1`` accumulate
    their partner's Gram in ``kgram`` (N, E, q·r, q·r) first; B-jobs with ``q > 1`` multiply by ``kron``
    (N, E, q, r, q, r), the block-diagonal ``I_q ⊗ inv`` whose off-diagonal blocks stay zero. On
    accelerators the products run stacked into ``out`` (N, E, ., .).
    """

    def __init__(self, jobs: list[Job], gram: Tensor, inv: Tensor) -> None:
        first = jobs[0]
        self.is_a, self.stacked = first.is_a, _stack_matmuls(first.param.device)
        self.params, self.partners = [j.param for j in jobs], [j.partner for j in jobs]
        n, r = len(jobs), gram.shape[-1]
        e = gram.shape[0] // n
        self.gram, self.inv = gram.view(n, e, r, r), inv.view(n, e, r, r)
        shape, cdtype, device = first.param.shape, gram.dtype, gram.device
        tall = first.partner.shape[-2] if self.is_a else shape[-2]  # the rows of B: out
        self.q = q = _kron_rows(r, tall, device)
        new = dict(dtype=cdtype, device=device)
        self.kgram = torch.empty(n, e, q * r, q * r, **new) if q > 1 and self.is_a else None
        self.kron = torch.zeros(n, e, q, r, q, r, **new) if q > 1 and not self.is_a else None
        self.out = torch.empty(n, e, *shape[-2:], **new) if self.stacked else None
        kron = self.kron.view(n, e, q * r, q * r) if self.kron is not None else [None] * n
        self.deferred = [DeferredGrad(p, self.is_a, m, k) for p, m, k in zip(self.params, self.inv, kron, strict=True)]
        self.deferrable = not self.stacked and first.param.dtype == cdtype

    def grams(self) -> None:
        """Step 1: ``BᵀB`` (A-jobs) or ``AAᵀ`` (B-jobs) of every partner into ``gram``."""
        xs = [_as3d(o, self.gram.dtype) for o in self.partners]  # N x (E, out, r) for A-jobs, (E, r, in) for B
        if self.stacked:
            x = torch.stack(xs)
            torch.matmul(x.mT, x, out=self.gram) if self.is_a else torch.matmul(x, x.mT, out=self.gram)
        elif not self.is_a:
            for x, g in zip(xs, self.gram, strict=True):
                torch.bmm(x, x.mT, out=g)
        elif self.kgram is None:
            for x, g in zip(xs, self.gram, strict=True):
                torch.bmm(x.mT, x, out=g)
        else:
            (n, e, r, _), q = self.gram.shape, self.q
            for x, g in zip(xs, self.kgram, strict=True):
                x = x.reshape(e, -1, q * r)  # (E, out/q, q·r), a view of a contiguous factor
                torch.bmm(x.mT, x, out=g)
            torch.sum(self.kgram.view(n, e, q, r, q, r).diagonal(dim1=2, dim2=4), -1, out=self.gram)

    def apply(self, grads: dict[Tensor, Tensor | DeferredGrad], defer: bool) -> None:
        """Step 3: ``grads[p] <- inv @ grads[p]`` (A) or ``grads[p] @ inv`` (B), now or deferred (CPU)."""
        if self.stacked:
            g = torch.stack([_as3d(grads[p], self.out.dtype) for p in self.params])  # (N, E, ., .)
            torch.matmul(self.inv, g, out=self.out) if self.is_a else torch.matmul(g, self.inv, out=self.out)
            for p, o in zip(self.params, self.out, strict=True):
                grads[p] = o.view(p.shape) if o.dtype == p.dtype else o.view(p.shape).to(p.dtype)
            return
        if self.kron is not None:
            (n, e, r, _), q = self.inv.shape, self.q
            self.kron.diagonal(dim1=2, dim2=4).copy_(self.inv.unsqueeze(-1).expand(n, e, r, r, q))
        for d in self.deferred:
            d.grad = grads[d.param]
            grads[d.param] = d if defer and self.deferrable else d.value()


class _Bucket(NamedTuple):
    """Blocks whose r x r systems are solved in one call: same rank, compute dtype and device."""

    blocks: list[_Block]
    gram: Tensor  # (K, r, r): every block's ``gram`` is a slice of it
    inv: Tensor  # (K, r, r): every block's ``inv`` is a slice of it
    reg: Tensor | float  # (K, 1) per-matrix ridge terms, or one float when all blocks share it


class _Plan:
    """Every buffer and view that preconditioning a fixed list of jobs needs, kept between steps."""

    def __init__(self, jobs: list[Job]) -> None:
        blocks: dict[tuple, list[Job]] = {}
        for job in jobs:  # blocks: same role, shapes, dtype, device and reg
            p = job.param
            blocks.setdefault((job.is_a, p.shape, job.partner.shape, p.dtype, p.device, job.reg), []).append(job)
        buckets: dict[tuple, list[list[Job]]] = {}
        for (is_a, shape, _, dtype, device, _), block_jobs in blocks.items():
            r = shape[-2] if is_a else shape[-1]
            buckets.setdefault((r, _compute_dtype(dtype), device), []).append(block_jobs)
        self.buckets = [self._bucket(r, cdtype, device, items) for (r, cdtype, device), items in buckets.items()]

    @staticmethod
    def _bucket(r: int, cdtype: torch.dtype, device: torch.device, items: list[list[Job]]) -> _Bucket:
        sizes = [len(js) * (js[0].param.shape[0] if js[0].param.dim() == 3 else 1) for js in items]
        gram = torch.empty(sum(sizes), r, r, dtype=cdtype, device=device)
        inv = torch.empty_like(gram)
        regs = [js[0].reg for js in items]
        reg = regs[0] if len(set(regs)) == 1 else torch.tensor(
            [g for g, n in zip(regs, sizes, strict=True) for _ in range(n)], dtype=cdtype, device=device
        )[:, None]  # fmt: skip
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        blocks = [_Block(js, gram[s : s + n], inv[s : s + n]) for js, s, n in zip(items, starts, sizes, strict=True)]
        return _Bucket(blocks, gram, inv, reg)

    def run(self, grads: dict[Tensor, Tensor | DeferredGrad], defer: bool) -> None:
        """Precondition ``grads`` of every job (the dict is updated; the tensors in it are not modified)."""
        for bucket in self.buckets:
            for block in bucket.blocks:
                block.grams()
            _ridge_inverse(bucket.gram, bucket.reg, out=bucket.inv)  # step 2
            for block in bucket.blocks:
                block.apply(grads, defer)


def _signature(jobs: list[Job]) -> tuple:
    """What a plan depends on: which tensors, their roles, shapes, dtypes, devices and ridge terms."""
    return tuple(
        (id(j.param), id(j.partner), j.is_a, j.reg, j.param.shape, j.partner.shape, j.param.dtype, j.param.device)
        for j in jobs
    )


@torch.no_grad()
def precondition_grads_(
    jobs: list[Job], grads: dict[Tensor, Tensor | DeferredGrad], scratch: dict, defer: bool = False
) -> None:
    """Replace ``grads[job.param]`` by its preconditioned gradient for every job (batched fast path).

    Same result as ``precondition_reference`` per factor (up to rounding), computed without autograd.

    Args:
        jobs: The factors to precondition, each with its partner factor and ridge term.
        grads: Working gradients keyed by parameter; updated in place (``.grad`` is never touched). The new
            values are buffers that the next call with the same jobs overwrites.
        scratch: Where the plans live between calls (keyed by the jobs' signature); the caller keeps it
            between steps.
        defer: Leave the product of CPU factors in the compute dtype to the reader: their entries become
            ``DeferredGrad`` objects, valid until the next call with the same jobs.
    """
    if not jobs:
        return
    key = _signature(jobs)
    plan = scratch.get(key)
    if plan is None:
        for old in list(scratch)[:-2]:  # keep the two newest (AdamW's reference_compat uses two per step)
            del scratch[old]
        plan = scratch[key] = _Plan(jobs)
    plan.run(grads, defer)
