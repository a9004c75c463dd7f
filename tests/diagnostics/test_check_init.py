"""riemix.diagnostics.check_init as a library: arguments are checked before any model is loaded."""

from __future__ import annotations

import pytest
import yaml

from riemix.diagnostics.check_init import check_init
from tests.helpers import save_tiny_model_dir


def test_check_init_rejects_bad_arguments_before_loading_a_model(tmp_path):
    with pytest.raises(ValueError, match=r"--threshold must be >= 0, got -1"):
        check_init("no-such-model", threshold=-1)
    with pytest.raises(ValueError, match=r"--trained needs a run directory with config.yaml"):
        check_init(str(tmp_path), trained=True)
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        check_init("no-such-model", dtype="int8")


def test_an_unknown_quantization_is_refused_before_loading():
    message = r"unknown quantization 'nf2'; expected one of \('nf4', 'fp4', 'int8'\) or None"
    with pytest.raises(ValueError, match=message):
        check_init("no-such-model", quantization="nf2")


def test_check_init_on_a_quantized_base_finds_the_zero_b_init_exact(tmp_path):
    pytest.importorskip("bitsandbytes")
    model_dir = save_tiny_model_dir(tmp_path)
    res = check_init(model_dir, adapter={"num_experts": 2, "rank": 2}, quantization="nf4", max_new_tokens=3)
    assert res["ok"] and res["kl_mean"] == 0.0 and "nf4 base" in res["what"]


def test_check_init_takes_a_runs_quantization(tmp_path):
    pytest.importorskip("bitsandbytes")
    model_dir = save_tiny_model_dir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model_dir, "quantization": "int8", "seed": 1}))
    res = check_init(run, adapter={"num_experts": 2, "rank": 2}, max_new_tokens=0)
    assert res["ok"] and "int8 base" in res["what"]
