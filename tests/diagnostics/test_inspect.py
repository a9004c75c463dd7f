"""riemix.diagnostics.inspect: honest wording (collapse, missing routing data), never-trained experts, no matplotlib."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from safetensors.torch import load_file, save_file

from riemix.diagnostics.inspect import format_tables, inspect_run
from riemix.diagnostics.plots import MATPLOTLIB_MISSING, PlotsUnavailable, write_plots
from riemix.diagnostics.rundir import load_run


def _copy(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def _drop_routing(run) -> None:
    (run / "diagnostics.json").unlink()
    lines = [x for x in (run / "metrics.jsonl").read_text().splitlines() if "diagnostics" not in x]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _edit_adapter(run, edit) -> None:
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights))


def test_inspect_without_diagnostics_says_so_and_shows_weight_columns_only(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    _drop_routing(run)
    result = inspect_run(run, tmp_path / "p")
    text = result["text"]
    assert text.startswith(f"no routing data: {run} has no diagnostics.json (train with --diagnostics-every N")
    header = next(line for line in text.splitlines() if line.startswith("layer"))
    assert header.split() == ["layer", "E", "sim>thr", "max_sim", "erank", "B=0"]  # no empty routing columns
    assert "q_proj" in text and "overall (adapter weights only, no routing data)" in text
    assert "least balanced routing" not in text and "mean gate entropy" not in text
    names = {p.name for p in result["plots"]}
    assert "curves.png" in names and "usage_heatmap.png" not in names


def test_run_with_neither_routing_nor_adapter(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "metrics.jsonl", run / "metrics.jsonl")
    kept = [x for x in (run / "metrics.jsonl").read_text().splitlines() if "diagnostics" not in x]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    text = inspect_run(run, plots=False)["text"]
    assert text.startswith(f"no per-layer data: {run} has neither diagnostics.json nor adapter/")
    assert not any(line.startswith("layer ") for line in text.splitlines())  # no empty table
    assert "  layers 0, experts 0" in text and "  loss " in text


def test_no_layer_is_called_collapsed_below_the_threshold(tiny_run):
    run = load_run(tiny_run)
    top = max(w["max_similarity"] for w in run["weights"].values())
    assert top < run["threshold"] == 0.8
    text = format_tables(run)
    assert f"  no collapsed layer (highest expert similarity {top:.4f} < 0.8 threshold, in " in text
    assert "most collapsed" not in text and "collapsed layers" not in text


def test_collapsed_layer_and_never_trained_experts_are_named(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    v1, q0 = "model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.q_proj"

    def edit(t):
        for key in (f"{v1}.lora_A", f"{v1}.lora_B"):  # experts 0 and 2 of one layer: identical updates
            t[key][2] = t[key][0]
        t[f"{q0}.lora_B"][1] = 0.0  # two experts of another layer never received an update
        t[f"{q0}.lora_B"][3] = 0.0

    _edit_adapter(run, edit)
    text = inspect_run(run, plots=False)["text"]
    verdict = f"  collapsed layers (two experts' BA similarity > 0.8): 1 of 8; most collapsed layer: {v1} (similarity"
    assert verdict + " 1.0000)" in text or verdict + " 0.9999" in text
    assert "  never-trained experts (B still all zero): 2 of 32 (0.self_attn.q_proj: 1, 3)" in text
    row = next(line for line in text.splitlines() if line.startswith("0.self_attn.q_proj"))
    assert row.split()[-1] == "2"  # the B=0 column
    lower = inspect_run(run, plots=False, threshold=-1.0)["text"]  # every layer above a threshold of -1
    assert "  collapsed layers (two experts' BA similarity > -1): 8 of 8; most collapsed layer: " + v1 in lower


PROJECTIONS = ("mlp.down_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")
LAYERS = [f"{block}.{proj}" for block in (0, 1) for proj in PROJECTIONS]


def _zero_expert_0(tensors) -> None:
    for key in [k for k in tensors if k.endswith(".lora_B")]:
        tensors[key][0] = 0.0


def test_never_trained_listing_names_every_layer(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    _edit_adapter(run, _zero_expert_0)
    text = inspect_run(run, plots=False)["text"]
    listed = "; ".join(f"{name}: 0" for name in LAYERS)
    assert f"  never-trained experts (B still all zero): 8 of 32 ({listed})" in text


def test_never_trained_listing_is_cut_after_max_layers(tiny_run, tmp_path, monkeypatch):
    import riemix.diagnostics.inspect as inspect_module

    monkeypatch.setattr(inspect_module, "MAX_LISTED_LAYERS", 3)
    run = _copy(tiny_run, tmp_path)
    _edit_adapter(run, _zero_expert_0)
    text = inspect_run(run, plots=False)["text"]
    listed = "; ".join(f"{name}: 0" for name in LAYERS[:3])
    assert f"8 of 32 ({listed}; ... (5 more layers))" in text


def test_old_diagnostics_without_untrained_field_show_a_dash(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    shutil.rmtree(run / "adapter")
    diag = json.loads((run / "diagnostics.json").read_text())
    for layer in diag["layers"].values():
        layer.pop("untrained_experts", None)
    (run / "diagnostics.json").write_text(json.dumps(diag))
    text = inspect_run(run, plots=False)["text"]
    assert "never-trained" not in text
    row = next(line for line in text.splitlines() if line.startswith("0.self_attn.q_proj"))
    assert row.split()[-1] == "-"


def test_missing_matplotlib_skips_plots_with_a_message(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = inspect_run(tiny_run, tmp_path / "p")
    assert result["plots"] == [] and result["plots_skipped"] == MATPLOTLIB_MISSING
    assert MATPLOTLIB_MISSING == "plots skipped: matplotlib is not installed (pip install matplotlib)"
    assert not (tmp_path / "p").exists() and "overall" in result["text"]
    with pytest.raises(ValueError, match=r"--layer 'nope' is not a layer of this run"):  # still checked first
        inspect_run(tiny_run, tmp_path / "p", layer="nope")


def test_broken_matplotlib_is_reported_as_such(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(PlotsUnavailable, match=r"^plots skipped: matplotlib cannot be imported \(.*matplotlib\.figure"):
        write_plots(load_run(tiny_run), tmp_path / "p")
    assert inspect_run(tiny_run, tmp_path / "p")["plots_skipped"].startswith("plots skipped: matplotlib cannot be")


def test_no_plots_means_nothing_skipped(tiny_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = inspect_run(tiny_run, plots=False)
    assert result["plots"] == [] and result["plots_skipped"] is None
