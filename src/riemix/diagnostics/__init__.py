"""Diagnostics of a mixture of LoRA experts (library only; the commands are in ``riemix.cli``).

- ``monitor``: routing statistics and expert geometry during training (``RoutingMonitor``,
  ``weight_diagnostics``, ``collect_diagnostics``), re-exported here with the geometry it reports
  (``effective_rank``, ``expert_singular_values`` from ``riemix.core.geometry``);
- ``rundir``, ``inspect``, ``plots``: a finished run's tables and plots (``riemix inspect``);
- ``check_init``: does an adapter initialisation change the base model's outputs (``riemix check-init``).
"""

from riemix.core.geometry import effective_rank, expert_singular_values
from riemix.diagnostics.monitor import (
    SIMILARITY_THRESHOLD,
    RoutingMonitor,
    coefficient_of_variation,
    collect_diagnostics,
    compact_diagnostics,
    expert_grad_norms,
    gate_entropy,
    model_grad_norms,
    usage_entropy,
    weight_diagnostics,
)

__all__ = [
    "SIMILARITY_THRESHOLD",
    "RoutingMonitor",
    "coefficient_of_variation",
    "collect_diagnostics",
    "compact_diagnostics",
    "effective_rank",
    "expert_grad_norms",
    "expert_singular_values",
    "gate_entropy",
    "model_grad_norms",
    "usage_entropy",
    "weight_diagnostics",
]
