"""Text tables of a continual run's results.json: the accuracy matrix, the metrics, experts over time, the
detector's decisions and which experts serve which skill (``riemix continual``, ``riemix inspect``)."""

from __future__ import annotations

from typing import Any

from riemix.continual.plots import skill_usage_matrix

__all__ = ["format_continual"]


def _cell(value: float | None) -> str:
    return f"{value:7.3f}" if value is not None else "      -"


def format_continual(results: dict[str, Any]) -> str:
    """The tables of a run's results (as many tasks as are done)."""
    stream = results["stream"]
    width = max(len(t) for t in stream + ["untrained"]) + 7
    head = " " * width + "".join(f"{t[:7]:>8s}" for t in stream)
    lines = ["accuracy R[k][i] (rows: after training task k; columns: task i)", head]
    rows = [("untrained", results.get("zero_shot") or [])]
    rows += [(f"after {stream[k]}", row) for k, row in enumerate(results.get("matrix", []))]
    for label, row in rows:
        lines.append(f"{label:{width}s}" + "".join(f" {_cell(v)}" for v in row))
    if results.get("tasks_done") == len(stream):
        lines.append(
            "Avg {avg:.3f}  average incremental {avg_incremental:.3f}  BWT {bwt:+.3f}  FWT {fwt:+.3f}".format(**results)
        )
    if results.get("decisions"):
        lines += ["", "novelty detector (cosine similarity to each known skill vs the threshold)"]
        for d in results["decisions"]:
            sims = ", ".join(f"{s:.3f}" for s in d.get("similarities", [])) or "-"
            lines.append(
                f"  {d['task']:{width - 2}s} {d['reason']:>8s}  skill {d['skill']}  [{sims}]  "
                f"threshold {d['threshold']:.3f}"
            )
    if results.get("experts"):
        lines += ["", "experts per layer after each task (min-max over layers; frozen)"]
        for h in results["experts"]:
            counts = list(h["experts"].values())
            frozen = sum(len(v) for v in h.get("frozen", {}).values())
            lines.append(f"  {h['task']:{width - 2}s} {min(counts)}-{max(counts)} experts, {frozen} frozen in all")
    if results.get("usage"):
        skills, usage = skill_usage_matrix(results["usage"])
        lines += [
            "",
            "per-skill expert usage (share of the skill's tokens, mean over layers)",
            " " * width + "".join(f"{'e' + str(e):>8s}" for e in range(len(usage[0]))),
        ]
        for skill, row in zip(skills, usage, strict=True):
            lines.append(f"{skill:{width}s}" + "".join(f" {_cell(v)}" for v in row))
    return "\n".join(lines)
