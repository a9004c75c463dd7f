"""``riemix export``: a run directory or an adapter directory to a directory transformers loads alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from riemix import save_adapter
from riemix.cli import main
from tests.helpers import save_tiny_model_dir
from tests.ship.common import adapted_tiny, logits, write_run


def test_a_run_directory_exports_and_loads(tmp_path, capsys):
    model_dir = save_tiny_model_dir(tmp_path)
    model, _ = adapted_tiny(model_dir, "dense")
    run = write_run(tmp_path / "run", model_dir, model)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
    assert f"exported {run} to {out}" in captured.err
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)

    assert main(["export", str(run), "--out", str(out)]) == 2  # now it exists
    assert "the export directory exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0


def test_an_adapter_directory_needs_model_and_merge_writes_a_plain_model(tmp_path, capsys):
    model_dir = save_tiny_model_dir(tmp_path)
    model, _ = adapted_tiny(model_dir, "global")
    adapter = save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "export"
    assert main(["export", str(adapter), "--out", str(out)]) == 2
    assert "adapter is an adapter directory: name the base model (--model)" in capsys.readouterr().err
    assert main(["export", str(adapter), "--out", str(out), "--model", model_dir, "--merge"]) == 0
    assert capsys.readouterr().out == f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(model), atol=1e-5, rtol=1e-5)


def test_help_and_a_missing_out(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(f in out for f in ("RUN_DIR|ADAPTER_DIR", "--out", "--model", "--merge", "--overwrite", "--dtype"))
    with pytest.raises(SystemExit) as exc:
        main(["export", "runs/x"])
    assert exc.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
