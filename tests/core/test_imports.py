"""The core tier's import rule: torch + safetensors only, and no other riemix tier (see riemix/core/__init__.py)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import riemix.core

CORE = Path(riemix.core.__file__).parent
FORBIDDEN = ("transformers", "accelerate")


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement in a file (anywhere: top level, functions, guards)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _core_files() -> list[Path]:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 10, files  # the scan really sees the tier
    return files


def test_core_files_do_not_import_transformers_or_accelerate():
    bad = [
        f"{path.name}:{line} imports {mod}"
        for path in _core_files()
        for line, mod in _imports(path)
        if mod.split(".")[0] in FORBIDDEN
    ]
    assert not bad, bad


def test_core_files_import_only_the_core_tier_of_riemix():
    bad = [
        f"{path.name}:{line} imports {mod}"
        for path in _core_files()
        for line, mod in _imports(path)
        if mod.startswith(".") or (mod.split(".")[0] == "riemix" and not mod.startswith("riemix.core."))
    ]
    assert not bad, bad


def test_scan_catches_a_forbidden_import(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from transformers import AutoModel\n    import riemix.io.adapter\n")
    assert _imports(path) == [(2, "transformers"), (3, "riemix.io.adapter")]


def test_importing_every_core_module_loads_neither_transformers_nor_accelerate():
    modules = [f"riemix.core.{p.stem}" for p in _core_files() if p.stem != "__init__"]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
