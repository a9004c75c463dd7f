"""``resolve_adapter_source`` / ``load_adapted``: run directories, adapter directories and what is refused."""

from __future__ import annotations

import pytest
import torch

from riemix import iter_moe_lora_layers, save_adapter
from riemix.ship.loading import load_adapted, resolve_adapter_source
from tests.ship.common import adapted_tiny, logits, write_run


def test_a_run_directory_names_its_adapter_and_model(model_dir, tmp_path):
    model, _ = adapted_tiny(model_dir)
    run = write_run(tmp_path / "run", model_dir, model)
    assert resolve_adapter_source(run) == (run / "adapter", model_dir)
    assert resolve_adapter_source(run / "adapter") == (run / "adapter", None)
    loaded, tokenizer = load_adapted(adapter=run)
    assert tokenizer is not None and not loaded.training
    assert len(list(iter_moe_lora_layers(loaded))) == 8
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_an_explicit_model_overrides_the_runs(model_dir, tmp_path):
    model, _ = adapted_tiny(model_dir)
    run = write_run(tmp_path / "run", "nobody/nothing-here", model)
    loaded, _ = load_adapted(model_dir, run)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_the_base_model_alone(model_dir):
    loaded, tokenizer = load_adapted(model_dir)
    assert tokenizer is not None and not list(iter_moe_lora_layers(loaded))


@pytest.mark.parametrize(
    "config,match",
    [
        (None, "run: the run directory has no saved adapter"),
        ("model: [1, 2]\n", r"config.yaml: 'model' must name the base model, got \[1, 2\]"),
        ("model: m\nmodel_kind: sequence_classification\n", "the run trained a sequence_classification model"),
        ("- a\n- b\n", "config.yaml: expected a mapping of run settings, got list"),
        ("model: [\n", "config.yaml: invalid YAML"),
    ],
)
def test_bad_run_directories_are_refused(config, match, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config if config is not None else "model: m\n")
    with pytest.raises(ValueError, match=match):
        resolve_adapter_source(run)


def test_paths_that_are_neither_are_refused(tmp_path):
    with pytest.raises(ValueError, match="nope: no such run or adapter directory"):
        resolve_adapter_source(tmp_path / "nope")
    with pytest.raises(
        ValueError, match=r"neither a run directory \(config.yaml and adapter/\) nor an adapter directory"
    ):
        resolve_adapter_source(tmp_path)


def test_options_are_checked(model_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"dtype must be one of \('float32', 'float64', 'bfloat16', 'float16'\), got 'int8'"
    ):
        load_adapted(model_dir, dtype="int8")
    with pytest.raises(ValueError, match=r"no adapter given: name the base model \(--model\)"):
        load_adapted()
    model, _ = adapted_tiny(model_dir)
    adapter = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"adapter is an adapter directory: name the base model \(--model\)"):
        load_adapted(adapter=adapter)
