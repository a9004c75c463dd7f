"""Quantized and low-precision bases: ``load_model(quantization=..., base_dtype=...)`` on CPU (bitsandbytes).

A tiny Llama saved as a directory is loaded in NF4, gets adapters (outputs unchanged at init, exactly),
trains a few steps and its adapter goes onto a freshly quantized base; int8 and FP4 load and run; a
classification head stays unquantized; a built-in GGUF name and a lone ``.gguf`` file are quantized like
a directory; a training run passes the options through; bad values and a missing bitsandbytes are refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig, add_moe_lora, build_optimizer, load_adapter, load_model, save_adapter
from riemix.core.state import adapter_state_dict
from riemix.hub import ModelLoadError
from riemix.hub.quantize import BASE_DTYPES, QUANTIZATIONS, own_unquantized_weights
from tests.helpers import make_tiny_bert, make_tiny_llama, save_tiny_model_dir, tiny_inputs, tiny_tokenizer

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")

ADAPTER = MoELoRAConfig(num_experts=4, top_k=2, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny_model_dir(tmp_path)


def _logits(model, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(seed)).logits


def _train(model, steps: int = 4) -> list[float]:
    """A few optimizer steps of the causal LM loss on fixed tokens; the losses."""
    optimizer = build_optimizer(model, "radamw", lr=1e-2)
    model.train()
    batch = tiny_inputs(seed=3, batch=4, seq=9)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_unknown_quantization_and_base_dtype_are_refused_before_loading(tmp_path):
    missing = str(tmp_path / "nothing-here")  # never read: the options are checked first
    with pytest.raises(ValueError, match=r"unknown quantization 'q4'; expected one of \('nf4', 'fp4', 'int8'\)"):
        load_model(missing, quantization="q4")
    with pytest.raises(ValueError, match=r"unknown base_dtype 'fp16'; expected one of \('fp32', 'bf16'\) or None"):
        load_model(missing, base_dtype="fp16")
    assert QUANTIZATIONS == ("nf4", "fp4", "int8") and BASE_DTYPES == ("fp32", "bf16")


def test_a_missing_bitsandbytes_names_the_extra_to_install(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(ModelLoadError, match=r"quantization='nf4' needs bitsandbytes.*pip install riemix\[quant\]"):
        load_model(model_dir, quantization="nf4")


def test_nf4_base_gets_adapters_with_unchanged_outputs_and_trains(model_dir):
    model, tokenizer = load_model(model_dir, quantization="nf4")
    reference, _ = load_model(model_dir, quantization="nf4")
    assert model.is_quantized and tokenizer is not None
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is nn.Linear  # transformers keeps the output embeddings unquantized
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    add_moe_lora(model, ADAPTER)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quantized_base and layer.call_base and (layer.in_features, layer.out_features) == (32, 32)
    assert torch.equal(_logits(model), _logits(reference))  # zero B: exactly the quantized base
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    losses = _train(model)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    after = adapter_state_dict(model)
    assert all(not torch.equal(after[k], before[k]) for k in before if k.endswith(("lora_A", "lora_B")))
    assert not torch.equal(_logits(model), _logits(reference))


def _trained_nf4(model_dir):
    model, _ = load_model(model_dir, quantization="nf4")
    add_moe_lora(model, ADAPTER)
    _train(model, steps=2)
    return model.eval()


def test_the_unquantized_weights_leave_the_checkpoint_mapping_and_stay_tied(model_dir):
    model, _ = load_model(model_dir, quantization="nf4")
    maps = Path("/proc/self/maps")
    if maps.is_file():  # Linux: no tensor keeps the checkpoint file mapped (its pages would stay resident)
        assert str(Path(model_dir) / "model.safetensors") not in maps.read_text()
    emb = nn.Embedding(4, 6)
    head = nn.Linear(6, 4, bias=False)
    head.weight = emb.weight  # tied: one Parameter
    part = nn.Parameter(emb.weight.data[1, 2:5])  # another Parameter viewing the same storage
    holder = nn.Module()
    holder.emb, holder.head, holder.part = emb, head, part
    before, ptr = emb.weight.detach().clone(), emb.weight.data_ptr()
    assert own_unquantized_weights(holder) == 1
    assert head.weight is emb.weight and emb.weight.data_ptr() != ptr and torch.equal(emb.weight, before)
    assert part.data_ptr() == emb.weight.data_ptr() + (6 + 2) * 4 and torch.equal(part, before[1, 2:5])


def test_an_nf4_adapter_goes_onto_a_freshly_quantized_base_with_equal_outputs(model_dir):
    model = _trained_nf4(model_dir)
    fresh, _ = load_model(model_dir, quantization="nf4")
    add_moe_lora(fresh, ADAPTER)
    tensors = adapter_state_dict(model)
    missing, unexpected = fresh.load_state_dict(tensors, strict=False)
    assert not unexpected and not set(tensors) & set(missing)
    assert torch.equal(_logits(fresh), _logits(model))


def test_an_nf4_adapter_round_trips_through_save_and_load_adapter(model_dir, tmp_path):
    model = _trained_nf4(model_dir)
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = load_model(model_dir, quantization="nf4")
    assert torch.equal(_logits(load_adapter(fresh, tmp_path / "adapter")), _logits(model))


def test_an_int8_adapter_round_trips_through_save_and_load_adapter(model_dir, tmp_path):
    model, _ = load_model(model_dir, quantization="int8")
    add_moe_lora(model, ADAPTER)
    _train(model, steps=2)
    save_adapter(model.eval(), tmp_path / "adapter")
    fresh, _ = load_model(model_dir, quantization="int8")
    assert torch.equal(_logits(load_adapter(fresh, tmp_path / "adapter")), _logits(model))


@pytest.mark.parametrize(("quantization", "cls"), [("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_fp4_and_int8_load_and_run_a_forward_and_backward(model_dir, quantization, cls):
    model, _ = load_model(model_dir, quantization=quantization)
    assert type(model.model.layers[1].mlp.down_proj).__name__ == cls
    reference = _logits(model)
    add_moe_lora(model, ADAPTER)
    assert torch.equal(_logits(model), reference)
    assert all(torch.isfinite(torch.tensor(_train(model, steps=1))))


def test_base_dtype_sets_the_unquantized_weights_and_the_4bit_compute_dtype(model_dir):
    plain, _ = load_model(model_dir, base_dtype="bf16")
    assert plain.dtype == torch.bfloat16
    model, _ = load_model(model_dir, quantization="nf4", base_dtype="bf16")
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    add_moe_lora(model, ADAPTER)
    assert model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32  # adapters stay fp32
    assert all(torch.isfinite(torch.tensor(_train(model, steps=1))))


def test_a_classification_head_stays_unquantized_in_fp32(tmp_path):
    make_tiny_bert().save_pretrained(tmp_path / "bert")
    model, _ = load_model(str(tmp_path / "bert"), task="sequence_classification", quantization="nf4")
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert type(model.classifier) is nn.Linear and model.classifier.weight.dtype == torch.float32


def test_a_builtin_gguf_and_a_lone_gguf_file_are_quantized_like_a_directory(fake_gguf, tmp_path):
    make_tiny_llama(seed=1).save_pretrained(tmp_path / "same")  # what the fake GGUF loader returns
    tiny_tokenizer().save_pretrained(tmp_path / "same")
    want = _logits(load_model(str(tmp_path / "same"), quantization="nf4")[0])
    builtin, _ = load_model("smollm2-135m", quantization="nf4")
    lone, tokenizer = load_model(str(tmp_path / "pkg" / "fake.gguf"), quantization="nf4")
    assert len(fake_gguf) == 2  # the fake loader ran for the cache and for the lone file
    for model in (builtin, lone):
        assert model.is_quantized and isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
        assert torch.equal(_logits(model), want)
    assert lone.config._name_or_path == str(tmp_path / "pkg") and tokenizer is not None


def test_a_training_run_loads_its_base_quantized(model_dir, tmp_path, mcq_files):
    from riemix.training.recipe import train
    from tests.helpers import base_cfg

    cfg = base_cfg(tmp_path, mcq_files, model=model_dir, quantization="nf4", max_steps=3, eval_batch_size=16)
    summary = train(cfg)
    assert summary["steps"] == 3 and 0 <= summary["after"]["accuracy"] <= 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
