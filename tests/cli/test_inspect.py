"""``riemix inspect`` on a tiny run (the ``tiny_run`` fixture): tables, PNG plots, a chosen layer, errors."""

from __future__ import annotations

import shutil
import sys

import pytest

from riemix.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_inspect_prints_layers_and_writes_pngs(tiny_run, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["inspect", str(tiny_run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for block in (0, 1):
        for proj in ("q_proj", "v_proj", "o_proj", "down_proj"):
            assert any(str(block) in line and proj in line for line in text.splitlines()), (block, proj)
    assert "entropy" in text and "dead" in text and "B=0" in text
    assert "  no collapsed layer (highest expert similarity " in text and "most collapsed" not in text
    assert "  never-trained experts (B still all zero): none of 32" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"usage_heatmap.png", "curves.png", "effective_rank.png"} <= set(pngs)
    assert any(name.startswith("similarity_") for name in pngs)
    for p in out.glob("*.png"):
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, p.name


def test_inspect_default_out_and_chosen_layer(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    layer = "model.layers.1.self_attn.v_proj"
    assert main(["inspect", str(run), "--layer", layer]) == 0
    assert (run / "plots" / f"similarity_{layer}.png").stat().st_size > 2000


def test_inspect_without_matplotlib_prints_why_no_plot(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["inspect", str(tiny_run), "--out", str(tmp_path / "plots")]) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith("plots skipped: matplotlib is not installed (pip install matplotlib)")
    assert "Traceback" not in captured.out + captured.err and "wrote " not in captured.out
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "bad_metrics", "bad_layer", "bad_diag", "bad_threshold"])
def test_inspect_errors_exit_2(tiny_run, tmp_path, capsys, case):
    run = tmp_path / "run"
    argv_extra: list[str] = []
    if case == "missing":
        run = tmp_path / "nope"
        match = "run directory not found"
    elif case == "empty":
        run.mkdir()
        match = "not a riemix run directory"
    else:
        shutil.copytree(tiny_run, run)
        if case == "bad_metrics":
            with open(run / "metrics.jsonl", "a") as fh:
                fh.write("{not json\n")
            match = "invalid JSON line"
        elif case == "bad_diag":
            (run / "diagnostics.json").write_text("{")
            match = "diagnostics.json: invalid JSON"
        elif case == "bad_threshold":
            argv_extra = ["--threshold", "3"]
            match = "threshold must be in [-1, 1], got 3.0"
        else:
            argv_extra = ["--layer", "model.layers.9.nothing"]
            match = "--layer 'model.layers.9.nothing' is not a layer of this run"
    assert main(["inspect", str(run), "--out", str(tmp_path / "o"), *argv_extra]) == 2
    err = capsys.readouterr().err
    assert "riemix inspect: error:" in err and match in err
