"""``protect_save_pretrained``: an adapted model never writes a checkpoint that a plain ``from_pretrained``
loads wrong."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from riemix import remove_moe_lora
from riemix.integrations import AdaptedSaveError, is_save_protected, protect_save_pretrained
from tests.helpers import make_tiny_llama, tiny_inputs
from tests.integrations.common import adapted_llama

REFUSED = r"save_pretrained is refused while the model carries MoE-LoRA adapters.*riemix\.save_adapter"


def test_unguarded_save_pretrained_writes_a_checkpoint_that_loads_wrong(tmp_path):
    """The problem: targeted weights are saved as ``...q_proj.base_layer.weight``; from_pretrained re-initialises
    ``...q_proj.weight`` without an error.  (The class's method: the unguarded one.)"""
    model = adapted_llama()
    type(model).save_pretrained(model, tmp_path / "full")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "full")
    base = make_tiny_llama()
    q_base = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, q_base)


def test_protected_save_pretrained_refuses_and_writes_nothing(tmp_path):
    model = protect_save_pretrained(adapted_llama())
    with pytest.raises(AdaptedSaveError, match=REFUSED) as info:
        model.save_pretrained(tmp_path / "full")
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in str(info.value)
    assert not (tmp_path / "full").exists()
    assert isinstance(info.value, ValueError)


def test_after_remove_moe_lora_save_pretrained_writes_a_checkpoint_that_loads_right(tmp_path):
    model = protect_save_pretrained(adapted_llama())
    remove_moe_lora(model)
    model.save_pretrained(tmp_path / "base")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, make_tiny_llama()(**inputs).logits, rtol=0, atol=0)


def test_the_class_method_still_writes_riemix_names_for_an_export(tmp_path):
    model = protect_save_pretrained(adapted_llama())
    type(model).save_pretrained(model, tmp_path / "export")  # what an export with its own modeling code does
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A" in keys


def test_deepcopy_guards_the_copy_and_only_the_copy(tmp_path):
    model = protect_save_pretrained(adapted_llama())
    clone = copy.deepcopy(model)
    assert is_save_protected(clone) and clone.save_pretrained.model is clone
    remove_moe_lora(clone)
    clone.save_pretrained(tmp_path / "clone")  # the copy lost its adapters: saves
    with pytest.raises(AdaptedSaveError, match=REFUSED):
        model.save_pretrained(tmp_path / "model")  # the original still has them


def test_pickling_keeps_the_guard(tmp_path):
    model = pickle.loads(pickle.dumps(protect_save_pretrained(adapted_llama())))
    assert is_save_protected(model) and model.save_pretrained.model is model
    with pytest.raises(AdaptedSaveError, match=REFUSED):
        model.save_pretrained(tmp_path / "x")


def test_protection_is_idempotent_and_leaves_other_modules_alone():
    model = protect_save_pretrained(adapted_llama())
    guard = model.save_pretrained
    assert is_save_protected(model) and protect_save_pretrained(model).save_pretrained is guard
    assert not is_save_protected(make_tiny_llama())  # the class is untouched
    plain = nn.Linear(2, 2)
    assert protect_save_pretrained(plain) is plain and not is_save_protected(plain)
    assert "save_pretrained" not in vars(plain)
def test_add_moe_lora_and_load_adapter_protect_save_pretrained(tmp_path):
    from riemix import load_adapter, save_adapter

    model = adapted_llama()
    assert is_save_protected(model)
    with pytest.raises(AdaptedSaveError, match=REFUSED):
        model.save_pretrained(tmp_path / "full")
    save_adapter(model, tmp_path / "adapter")
    assert is_save_protected(load_adapter(make_tiny_llama(), tmp_path / "adapter"))
    assert not is_save_protected(nn.Sequential(nn.Linear(4, 4)))
