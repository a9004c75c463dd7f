"""What data-parallel training needs beyond DDP's gradient averaging: sums and gathers across processes.

``torchrun --nproc_per_node N -m riemix train ...`` (or ``accelerate launch --multi_gpu``) starts N processes;
Accelerate wraps the model in DDP, which averages gradients.  The recipe normalises each step's loss by the
number of target tokens of the whole global batch (every micro-batch of every process), so N processes
compute exactly what one process computes on the same global batch.  These helpers are no-ops in a single
process. Evaluation shards the examples and gathers the predictions back (``riemix.evaluate.evaluate``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_sum", "is_distributed", "rss_per_process", "rank_and_world"]


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` without a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """The element-wise sum of ``values`` over every process (fp64; one collective for the list)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)  # (n,)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _rss_mib() -> tuple[float, float]:
    """This process's (peak, current) resident memory in MiB (Linux ``/proc/self/status``; 0 elsewhere)."""
    found = {}
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                found[key] = int(value.split()[0]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return found.get("VmHWM", 0.0), found.get("VmRSS", 0.0)


def rss_per_process() -> dict[str, list[float]]:
    """Every process's peak and current resident memory, in MiB, in rank order:
    ``{"peak": [...], "now": [...]}`` (the peak includes loading the model, before any sharding)."""
    own = _rss_mib()
    rows = [own]
    if is_distributed():
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, own)
    return {"peak": [r[0] for r in rows], "now": [r[1] for r in rows]}
