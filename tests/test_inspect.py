"""``riemix inspect`` on a tiny run: tables, PNG plots, adapter-only diagnostics, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from riemix.cli import main
from riemix.diagnostics.inspect import adapter_diagnostics, inspect_run
from riemix.diagnostics.monitor import weight_diagnostics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from test_train import base_cfg, tiny_tokenizer, write_mcq
    from tiny import make_tiny_llama

    from riemix.training.recipe import train

    tmp = tmp_path_factory.mktemp("inspect")
    files = write_mcq(tmp / "train.jsonl", 32, 0), write_mcq(tmp / "dev.jsonl", 8, 1)
    cfg = base_cfg(
        tmp,
        files,
        max_steps=3,
        log_every=1,
        eval_every=2,
        diagnostics_every=1,
        load_balance_coef=0.01,
        diversity_coef=0.01,
    )
    train(cfg, model=make_tiny_llama(), tokenizer=tiny_tokenizer())
    return tmp / "run"


def test_inspect_prints_layers_and_writes_pngs(tiny_run, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["inspect", str(tiny_run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for block in (0, 1):
        for proj in ("q_proj", "v_proj", "o_proj", "down_proj"):
            assert any(str(block) in line and proj in line for line in text.splitlines()), (block, proj)
    assert "entropy" in text and "dead" in text and "most collapsed layer" in text
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


def test_adapter_weight_diagnostics_match_the_saved_tensors(tiny_run):
    from safetensors.torch import load_file

    diags = adapter_diagnostics(tiny_run / "adapter")
    assert len(diags) == 8
    tensors = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    want = weight_diagnostics(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"])
    assert diags[name]["effective_rank"] == pytest.approx(want["effective_rank"])
    prods = torch.stack(
        [b @ a for a, b in zip(tensors[f"{name}.lora_A"].double(), tensors[f"{name}.lora_B"].double(), strict=True)]
    )
    flat = prods.reshape(len(prods), -1)
    ref = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    torch.testing.assert_close(torch.tensor(diags[name]["similarity"], dtype=torch.float64), ref)


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


def test_metrics_lines_must_have_a_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected an object with a 'step'"):
        inspect_run(run, plots=False)


def test_adapter_with_missing_or_corrupt_tensors(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from riemix.io.adapter import AdapterError

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.0.self_attn.q_proj.lora_B"]
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match=r"module 'model.layers.0.self_attn.q_proj' are missing"):
        adapter_diagnostics(adapter)
    weights.write_bytes(b"garbage")
    with pytest.raises(AdapterError, match=r"cannot read adapter weights"):
        adapter_diagnostics(adapter)
