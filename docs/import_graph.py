"""The import graph of ``src/riemix`` by tier, checked by ``tests/test_architecture.py`` and drawn here.

    python docs/import_graph.py        # prints the tier edges, writes docs/img/import_graph.png

A tier is a subpackage (``core``, ``optim``, ...) or a top-level module (``tasks``, ``evaluate``, ...).
Every ``import riemix...`` / ``from riemix... import`` statement counts, including imports inside
functions, since they run too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

__all__ = ["ALLOWED", "POSITIONS", "draw", "module_imports", "reduced", "tier", "tier_edges"]

SRC = Path(__file__).resolve().parent.parent / "src" / "riemix"

#: Where each tier is drawn (x, y): lower tiers lower; placed so that no arrow crosses a box.
POSITIONS: dict[str, tuple[float, float]] = {
    "core": (-1.5, 0), "data": (0, 0), "metrics": (1.5, 0),
    "io": (-0.8, 1), "tasks": (0.8, 1),
    "optim": (-1.9, 2.2), "hub": (0.3, 2),
    "diagnostics": (-0.5, 3), "evaluate": (1.2, 3), "ship": (-1.9, 3.6),
    "training": (0, 4), "continual": (1.4, 4.2), "cli": (0, 5), "integrations": (-1.1, 5),
}  # fmt: skip

#: What each tier may import (besides itself); the graph must stay acyclic.
#: ``riemix`` is the package's ``__init__`` (the public API).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "data": set(),
    "metrics": set(),
    "optim": {"core"},
    "io": {"core"},
    "tasks": {"data"},
    "hub": {"data", "io", "tasks"},
    "evaluate": {"data", "hub", "io", "metrics", "tasks"},
    "diagnostics": {"core", "hub", "io"},
    "training": {"core", "data", "diagnostics", "evaluate", "hub", "io", "optim", "tasks"},
    "continual": {"core", "data", "diagnostics", "evaluate", "hub", "io", "optim", "tasks", "training"},  # dynamic experts: detect, grow, replay; the continual recipe
    "ship": {"core", "hub", "io"},  # merge (core), load (hub) and write (io): export and generation
    "integrations": {"core", "diagnostics", "io", "optim"},  # transformers.Trainer / TRL: the recipe's step
    "cli": {"continual", "core", "data", "diagnostics", "evaluate", "hub", "io", "optim", "ship", "tasks", "training"},
    # hub: load_model, ship: export_model, integrations: RiemixTrainer & co., each imported on first use
    "riemix": {"core", "hub", "integrations", "io", "optim", "ship"},
    "__main__": {"cli"},
}


def _module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(src: Path = SRC) -> dict[str, set[str]]:
    """``{module: {riemix modules it imports}}`` for every module under ``src`` (relative imports resolved)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.py")):
        mod = _module_name(path, src)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                targets.add(".".join(base + ([node.module] if node.module else [])))
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets.add(node.module)
        graph[mod] = {t for t in targets if t == "riemix" or t.startswith("riemix.")}
    return graph


def tier(module: str) -> str:
    """``riemix.core.layer`` -> ``core``; ``riemix`` -> ``riemix``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def tier_edges(src: Path = SRC) -> dict[str, set[str]]:
    """``{tier: {other tiers it imports}}``."""
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, targets in module_imports(src).items():
        edges[tier(mod)].update(tier(t) for t in targets if tier(t) != tier(mod))
    return dict(edges)


def reduced(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The edges not implied by a longer path (transitive reduction of the acyclic tier graph)."""

    def reach(node: str, seen: set[str]) -> set[str]:
        for nxt in edges.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    return {
        a: {b for b in targets if not any(b in reach(c, set()) for c in targets - {b})} for a, targets in edges.items()
    }


def draw(path: Path) -> Path:
    """Draw the tiers in their layers with an arrow per direct import edge (matplotlib) into ``path``.

    Edges implied by a longer path are left out (``reduced``) so that the picture stays readable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = reduced(tier_edges())
    pos = POSITIONS
    fig, ax = plt.subplots(figsize=(8, 6))
    for src, targets in edges.items():
        for dst in targets:
            if src in pos and dst in pos:
                ax.annotate(
                    "",
                    xy=pos[dst],
                    xytext=pos[src],
                    arrowprops={
                        "arrowstyle": "->",
                        "color": "0.5",
                        "shrinkA": 18,
                        "shrinkB": 18,
                        "connectionstyle": "arc3,rad=0.05",
                    },
                )
    for name, (x, y) in pos.items():
        face = "#cfe3ff" if name == "core" else "#f2f2f2"
        ax.text(
            x,
            y,
            name,
            ha="center",
            va="center",
            fontsize=11,
            bbox={"boxstyle": "round,pad=0.5", "facecolor": face, "edgecolor": "0.3"},
        )
    ax.set_xlim(-2.4, 2)
    ax.set_ylim(-0.5, 5.5)
    ax.axis("off")
    ax.set_title("riemix tiers: arrows point at the imported tier\n(an edge implied by a longer path is not drawn)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for name, targets in sorted(tier_edges().items()):
        print(f"{name:12} -> {', '.join(sorted(targets))}")
    print(f"wrote {draw(Path(__file__).parent / 'img' / 'import_graph.png')}")
