"""riemix.diagnostics.inspect: the report of a run without recorded diagnostics falls back to the adapter."""

from __future__ import annotations

import shutil

from riemix.diagnostics.inspect import inspect_run


def test_inspect_without_diagnostics_uses_adapter_only(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "diagnostics.json").unlink()
    lines = [x for x in (run / "metrics.jsonl").read_text().splitlines() if "diagnostics" not in x]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = inspect_run(run, tmp_path / "p")
    assert "no diagnostics.json" in result["text"] and "q_proj" in result["text"]
    names = {p.name for p in result["plots"]}
    assert "curves.png" in names and "usage_heatmap.png" not in names
