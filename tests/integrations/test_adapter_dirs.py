"""``save_trainer_adapter`` / ``load_adapter_weights``: adapter-only trainer directories and their checks."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from riemix import AdapterError, freeze_experts, iter_moe_lora_layers, save_adapter
from riemix.core.freezing import frozen_expert_map
from riemix.integrations import (
    TRAINABLE_NAME,
    is_adapter_dir,
    load_adapter_weights,
    save_trainer_adapter,
)
from tests.helpers import make_tiny_llama
from tests.integrations.common import adapted_llama, adapter_tensors

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def trained(seed: int = 5, **overrides):
    """An adapted model whose adapter tensors are all non-zero (B included)."""
    model = adapted_llama(**overrides)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_round_trip_into_an_adapted_model_next_to_other_files(tmp_path):
    (tmp_path / "optimizer.pt").write_bytes(b"kept")
    source = trained()
    save_trainer_adapter(source, tmp_path, extra={"global_step": 7})
    assert (tmp_path / "optimizer.pt").read_bytes() == b"kept"
    assert is_adapter_dir(tmp_path) and not is_adapter_dir(tmp_path / "missing")
    assert json.loads((tmp_path / CONFIG).read_text())["extra"] == {"global_step": 7}
    assert not list(tmp_path.glob(".riemix-save-*"))  # the staging directory is gone
    target = load_adapter_weights(adapted_llama(adapter_seed=42), tmp_path)
    for key, value in adapter_tensors(source).items():
        torch.testing.assert_close(adapter_tensors(target)[key], value, rtol=0, atol=0)


def test_trainables_outside_the_adapter_round_trip_and_a_later_save_without_them_drops_the_file(tmp_path):
    source = trained()
    source.lm_head.weight.requires_grad_(True)
    with torch.no_grad():
        source.lm_head.weight.mul_(2.0)
    save_trainer_adapter(source, tmp_path)
    assert set(load_file(str(tmp_path / TRAINABLE_NAME))) == {"lm_head.weight"}
    target = adapted_llama()
    target.lm_head.weight.requires_grad_(True)
    load_adapter_weights(target, tmp_path)
    assert torch.equal(target.lm_head.weight, source.lm_head.weight)
    save_trainer_adapter(trained(), tmp_path)
    assert not (tmp_path / TRAINABLE_NAME).exists()


def test_save_refuses_non_finite_trainables(tmp_path):
    model = trained()
    model.lm_head.weight.requires_grad_(True)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in \['lm_head.weight'\]"):
        save_trainer_adapter(model, tmp_path)
    assert not (tmp_path / CONFIG).exists()


@pytest.fixture
def saved(tmp_path):
    save_trainer_adapter(trained(), tmp_path)
    return tmp_path


def test_refuses_a_directory_without_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match="adapter config not found"):
        load_adapter_weights(adapted_llama(), tmp_path)


def test_refuses_missing_weights(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(AdapterError, match="adapter weights not found"):
        load_adapter_weights(adapted_llama(), saved)


def test_refuses_corrupt_weights(saved):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (saved / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum mismatch"):
        load_adapter_weights(adapted_llama(), saved)


def test_refuses_a_model_without_adapters(saved):
    with pytest.raises(AdapterError, match="no MoE-LoRA adapters to load into; .*riemix.load_adapter"):
        load_adapter_weights(make_tiny_llama(), saved)


def test_refuses_other_adapted_modules(saved):
    with pytest.raises(AdapterError, match=r"adapts other modules than this model \(saved only: \['model.layers.0"):
        load_adapter_weights(adapted_llama(target_modules=["q_proj"]), saved)


def test_refuses_other_dimensions(saved):
    with pytest.raises(
        AdapterError, match=r"has \(in, out, experts, rank\) = \(32, 32, 4, 2\), the adapter \(32, 32, 4, 4\)"
    ):
        load_adapter_weights(adapted_llama(rank=2), saved)


def test_refuses_other_base_weights(saved):
    with pytest.raises(AdapterError, match="base weights differ from those the adapter was saved on in 6 module"):
        load_adapter_weights(adapted_llama(seed=3), saved)


def test_refuses_other_tensor_names(tmp_path):
    save_adapter(
        trained(expert_scales=False, scale_anchor_beta=0.0), tmp_path
    )  # same layers, but the model below has expert scales
    with pytest.raises(AdapterError, match=r"tensor names differ from the model's: \['model.layers.0.*expert_scale"):
        load_adapter_weights(adapted_llama(), tmp_path)


def test_refuses_a_missing_or_corrupt_trainables_file(tmp_path):
    model = trained()
    model.lm_head.weight.requires_grad_(True)
    save_trainer_adapter(model, tmp_path)
    save_file({"lm_head.weight": torch.zeros(64, 32)}, str(tmp_path / TRAINABLE_NAME))
    with pytest.raises(AdapterError, match=r"riemix_trainable.safetensors: missing or corrupt"):
        load_adapter_weights(model, tmp_path)


def test_refuses_trainables_the_model_does_not_have(saved):
    model = adapted_llama()
    model.lm_head.weight.requires_grad_(True)  # trainable here, not when saved
    before = adapter_tensors(model)
    with pytest.raises(AdapterError, match=r"riemix_trainable.safetensors: tensor names differ .*\['lm_head.weight'\]"):
        load_adapter_weights(model, saved)
    after = adapter_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was copied


def rewrite_weights(folder, change) -> str:
    """Apply ``change`` to the first ``lora_A`` tensor of a saved adapter and re-record its checksum."""
    tensors = load_file(str(folder / WEIGHTS))
    key = next(k for k in tensors if k.endswith("lora_A"))
    tensors[key] = change(tensors[key])
    save_file(tensors, str(folder / WEIGHTS))
    meta = json.loads((folder / CONFIG).read_text())
    meta["weights_sha256"] = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    (folder / CONFIG).write_text(json.dumps(meta))
    return key


def test_refuses_a_tensor_of_another_shape(saved):
    key = rewrite_weights(saved, lambda t: t[:, :-1].contiguous())
    with pytest.raises(AdapterError, match=rf"{key} has shape \(4, 3, 32\), the model's \(4, 4, 32\)"):
        load_adapter_weights(adapted_llama(), saved)


def test_refuses_non_finite_tensors(saved):
    key = rewrite_weights(saved, lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))
    with pytest.raises(AdapterError, match=rf"{key} holds non-finite values"):
        load_adapter_weights(adapted_llama(), saved)


def test_frozen_experts_round_trip_into_an_adapted_model(tmp_path):
    source = trained()
    names = [name for name, _ in iter_moe_lora_layers(source)]
    freeze_experts(source, {names[1]: [0]}, router=True)
    save_trainer_adapter(source, tmp_path)
    target = adapted_llama(adapter_seed=42)
    freeze_experts(target, {names[0]: [1]})  # not saved: unfrozen by the load
    load_adapter_weights(target, tmp_path)
    assert frozen_expert_map(target) == {names[1]: [0]} and frozen_expert_map(target, router=True) == {names[1]: [0]}
    for key, value in adapter_tensors(source).items():
        torch.testing.assert_close(adapter_tensors(target)[key], value, rtol=0, atol=0)
