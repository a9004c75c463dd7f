"""The package's import graph: tiers import only what ``docs/import_graph.py`` allows, and nothing cycles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _import_graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


graph = _import_graph_module()


def test_every_tier_has_a_rule():
    edges = graph.tier_edges()
    assert set(edges) <= set(graph.ALLOWED), sorted(set(edges) - set(graph.ALLOWED))
    assert set(graph.POSITIONS) == set(graph.ALLOWED) - {"riemix", "__main__"}


@pytest.mark.parametrize("tier", sorted(_import_graph_module().ALLOWED))
def test_tier_imports_only_what_it_may(tier):
    found = graph.tier_edges().get(tier, set())
    assert found <= graph.ALLOWED[tier], f"{tier} imports {sorted(found - graph.ALLOWED[tier])}, not allowed"


def test_allowed_tier_graph_is_acyclic():
    allowed = {t: set(deps) for t, deps in graph.ALLOWED.items()}
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"cycle: {' -> '.join(path + (node,))}"
        if node in done:
            return
        for nxt in allowed.get(node, ()):
            visit(nxt, path + (node,))
        done.add(node)

    for tier in allowed:
        visit(tier, ())


def test_no_module_level_import_cycle():
    """Module graph (every riemix import, at any depth of the file) has no cycle between modules."""
    modules = graph.module_imports()
    # ``from riemix.x import y`` may name a submodule y: resolve targets to modules that exist.
    known = set(modules)
    edges = {m: {t for t in targets if t in known and t != m} for m, targets in modules.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_a_forbidden_import(tmp_path):
    pkg = tmp_path / "riemix"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "bad.py").write_text("def f():\n    from riemix.training.recipe import train\n")
    assert graph.tier_edges(pkg)["core"] == {"training"}
