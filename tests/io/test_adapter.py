"""Adapter files: bit-exact round trip, atomic writes, clear errors for mismatches and corruption."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from riemix import (
    AdapterError,
    MoELoRAConfig,
    add_moe_lora,
    build_optimizer,
    iter_moe_lora_layers,
    load_adapter,
    remove_moe_lora,
    save_adapter,
)
from riemix.core.freezing import freeze_experts, frozen_expert_map
from riemix.core.schedules import set_scale_progress
from riemix.io.adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from riemix.io.fingerprint import weight_digest
from tests.helpers import make_tiny_bert, make_tiny_llama, tiny_inputs

CFG = dict(num_experts=3, top_k=2, rank=2, target_modules=["q_proj", "v_proj"])


def perturb_trainable(model, scale: float, seed: int) -> None:
    """Simulated training: move every adapter parameter by seeded Gaussian noise."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def trained_llama(cfg: MoELoRAConfig, seed: int = 0):
    model = add_moe_lora(make_tiny_llama(seed=seed), cfg)
    torch.manual_seed(123)
    with torch.no_grad():
        for _, layer in iter_moe_lora_layers(model):
            layer.lora_A.normal_()
            layer.lora_B.normal_()
            layer.router.weight.normal_()
    return model


@pytest.mark.parametrize("num_experts", [3, [2, 4], lambda i: 2 + i])
def test_round_trip_is_bit_exact(tmp_path, num_experts):
    cfg = MoELoRAConfig(**{**CFG, "num_experts": num_experts})
    model = trained_llama(cfg)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    restored = load_adapter(make_tiny_llama(), tmp_path / "adapter")
    a, b = dict(iter_moe_lora_layers(model)), dict(iter_moe_lora_layers(restored))
    assert a.keys() == b.keys()
    for name in a:
        for attr in ("lora_A", "lora_B"):
            assert torch.equal(getattr(a[name], attr), getattr(b[name], attr))
        assert torch.equal(a[name].router.weight, b[name].router.weight)
        assert a[name].num_experts == b[name].num_experts
    assert torch.equal(model(**tiny_inputs()).logits, restored(**tiny_inputs()).logits)
    trainable = {n for n, p in restored.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B", "router.weight")) for n in trainable)


def test_config_contents(tmp_path):
    model = trained_llama(MoELoRAConfig(**CFG))
    save_adapter(model, tmp_path, extra={"task": "demo"})
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format_version"] == 1 and meta["config"]["rank"] == 2 and meta["extra"] == {"task": "demo"}
    assert meta["base_model"]["model_class"] == "LlamaForCausalLM"
    assert meta["base_model"]["modules"]["model.layers.0.self_attn.q_proj"] == {
        "in_features": 32,
        "out_features": 32,
        "num_experts": 3,
        "rank": 2,
        "weight_sha256": weight_digest(make_tiny_llama().model.layers[0].self_attn.q_proj.weight),
        "weight_dtype": "float32",
    }


def test_an_adapter_is_refused_on_another_checkpoint_of_the_same_architecture(tmp_path):
    save_adapter(trained_llama(MoELoRAConfig(**CFG)), tmp_path)
    other = make_tiny_llama(seed=5)  # same shapes, other weights
    with pytest.raises(AdapterError, match=r"weights differ from those the adapter was trained on in 4 of 4 .*--force"):
        load_adapter(other, tmp_path)
    assert not list(iter_moe_lora_layers(other))  # untouched
    with pytest.warns(UserWarning, match=r"Loaded anyway \(force\)"):
        load_adapter(other, tmp_path, force=True)
    wider = make_tiny_llama(dtype=torch.float64)  # the same checkpoint held in fp64: verified after a cast
    load_adapter(wider, tmp_path)
    with pytest.warns(UserWarning, match=r"cannot verify the base weights of 4 module\(s\) held in a narrower dtype"):
        load_adapter(make_tiny_llama(dtype=torch.bfloat16), tmp_path)


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    model = trained_llama(MoELoRAConfig(**CFG))
    save_adapter(model, tmp_path)
    old = (tmp_path / WEIGHTS_NAME).read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("riemix.io.adapter.save_file", boom)
    with torch.no_grad():
        next(iter_moe_lora_layers(model))[1].lora_B.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp leftovers
    load_adapter(make_tiny_llama(), tmp_path)  # still a consistent adapter


def test_save_without_adapters_rejected(tmp_path):
    with pytest.raises(ValueError, match="no MoE-LoRA adapters to save"):
        save_adapter(make_tiny_llama(), tmp_path)


def test_mismatched_base_model_names_the_difference(tmp_path):
    save_adapter(trained_llama(MoELoRAConfig(**CFG)), tmp_path)
    with pytest.raises(AdapterError, match=r"model class is BertForSequenceClassification.*saved on LlamaForCausalLM"):
        load_adapter(make_tiny_bert(), tmp_path)
    with pytest.raises(AdapterError, match=r"q_proj' has shape in=48, out=48; adapter expects in=32, out=32"):
        load_adapter(make_tiny_llama(hidden=48), tmp_path)
    with pytest.raises(AdapterError, match=r"module 'model.layers.1.self_attn.q_proj' does not exist"):
        load_adapter(make_tiny_llama(layers=1), tmp_path)


def test_corrupt_or_missing_files(tmp_path):
    save_adapter(trained_llama(MoELoRAConfig(**CFG)), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum mismatch"):
        load_adapter(make_tiny_llama(), tmp_path)
    weights.unlink()
    with pytest.raises(AdapterError, match="adapter weights not found"):
        load_adapter(make_tiny_llama(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="corrupt adapter config"):
        load_adapter(make_tiny_llama(), tmp_path)
    with pytest.raises(AdapterError, match="adapter config not found"):
        load_adapter(make_tiny_llama(), tmp_path / "nowhere")


def test_non_finite_weights_with_a_valid_checksum_are_refused(tmp_path):
    model = trained_llama(MoELoRAConfig(**CFG))
    _, layer = next(iter_moe_lora_layers(model))
    with torch.no_grad():
        layer.lora_B[0, 0, 0] = float("nan")
        layer.lora_A[0, 0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to save the adapter to .*non-finite values \(NaN or inf\)"):
        save_adapter(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with torch.no_grad():
        layer.lora_A[0, 0, 1], layer.lora_B[0, 0, 0] = 0.0, 0.0
    save_adapter(model, tmp_path)  # then the file is edited by hand, its checksum updated: still refused
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    tensors[next(k for k in tensors if k.endswith("lora_A"))][0, 0, 1] = float("inf")
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["weights_sha256"] = hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=r"holds 1 non-finite value\(s\) \(NaN or inf\)"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_save_adapter_replaces_only_an_adapter_directory(tmp_path):
    model = trained_llama(MoELoRAConfig(**CFG))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not an adapter's: \['notes.txt'\]"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="it is a file, not a directory"):
        save_adapter(model, tmp_path / "notes.txt")
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "a")  # an adapter directory is replaced whole
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_unsupported_format_version(tmp_path):
    save_adapter(trained_llama(MoELoRAConfig(**CFG)), tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["format_version"] = 99
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="format_version 99 is not supported"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_failed_load_leaves_model_untouched(tmp_path):
    save_adapter(trained_llama(MoELoRAConfig(**CFG)), tmp_path)
    base = make_tiny_llama(hidden=48)
    with pytest.raises(AdapterError):
        load_adapter(base, tmp_path)
    assert not list(iter_moe_lora_layers(base))


def test_pissa_save_load_reproduces_trained_model_exactly(tmp_path):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    cfg = MoELoRAConfig(num_experts=3, top_k=2, rank=2, init="pissa", target_modules=targets, expert_scales=True)
    model = add_moe_lora(make_tiny_llama(), cfg)
    perturb_trainable(model, 0.05, seed=5)
    save_adapter(model, tmp_path / "pissa")
    restored = load_adapter(make_tiny_llama(), tmp_path / "pissa")
    for (name, a), (_, b) in zip(iter_moe_lora_layers(model), iter_moe_lora_layers(restored), strict=True):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight), name  # residual rebuilt bit-exactly
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    assert torch.equal(restored(**tiny_inputs()).logits, model(**tiny_inputs()).logits)


@pytest.mark.parametrize(
    "extra",
    [
        dict(routing="global", expert_scales=True, router_temperature=0.7),
        dict(routing="top_p", top_p=0.5, top_k=3, router_noise_std=0.1),
        dict(routing="softmax_topk", expert_scales=True, scale_warmup_steps=3),
    ],
)
def test_save_load_round_trips_new_parameters_and_state(tmp_path, extra):
    cfg = MoELoRAConfig(**{**CFG, **extra})
    model = add_moe_lora(make_tiny_llama(), cfg)
    perturb_trainable(model, 0.3, seed=3)
    set_scale_progress(model, 2)
    for _, layer in iter_moe_lora_layers(model):
        layer.router_temperature = 0.9
    save_adapter(model, tmp_path / "a")
    restored = load_adapter(make_tiny_llama(), tmp_path / "a")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loaded = {n: p for n, p in restored.named_parameters() if p.requires_grad}
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[n], loaded[n]) for n in trained)
    for (_, a), (_, b) in zip(iter_moe_lora_layers(model), iter_moe_lora_layers(restored), strict=True):
        assert (a.scale_factor, a.router_temperature) == (b.scale_factor, b.router_temperature)
    torch.testing.assert_close(restored(**tiny_inputs()).logits, model(**tiny_inputs()).logits, atol=0, rtol=0)


@pytest.fixture(scope="module")
def saved_meta(tmp_path_factory) -> dict:
    """The parsed ``adapter_config.json`` of a freshly saved tiny adapter."""
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(trained_llama(MoELoRAConfig(**CFG)), folder)
    return json.loads((folder / CONFIG_NAME).read_text())


@pytest.mark.parametrize(
    ("top_level", "kind"), [([1, 2], "list"), (3.5, "float"), ("riemix-moe-lora", "str"), (None, "NoneType")]
)
def test_config_that_is_not_a_json_object_is_refused(tmp_path, top_level, kind):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(top_level))
    msg = rf"{re.escape(str(tmp_path / CONFIG_NAME))}: not a riemix adapter \(expected a JSON object, got {kind}\)"
    with pytest.raises(AdapterError, match=msg):
        read_adapter_config(tmp_path)
    with pytest.raises(AdapterError, match=msg):
        load_adapter(make_tiny_llama(), tmp_path)


def _drop(meta: dict, *keys: str) -> None:
    for key in keys[:-1]:
        meta = meta[key]
    del meta[keys[-1]]


def _set(meta: dict, *keys_and_value) -> None:
    *keys, value = keys_and_value
    for key in keys[:-1]:
        meta = meta[key]
    meta[keys[-1]] = value


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: _drop(m, "config"), "required key config is missing"),
        (lambda m: _drop(m, "base_model"), "required key base_model is missing"),
        (lambda m: _drop(m, "weights_sha256"), "required key weights_sha256 is missing"),
        (lambda m: _drop(m, "base_model", "model_class"), "required key base_model.model_class is missing"),
        (lambda m: _drop(m, "base_model", "modules"), "required key base_model.modules is missing"),
        (
            lambda m: _drop(m, "base_model", "modules", Q0, "rank"),
            f"required key base_model.modules.{Q0}.rank is missing",
        ),
        (lambda m: _set(m, "config", [1, 2]), "config must be a JSON object, got list"),
        (lambda m: _set(m, "config", None), "config must be a JSON object, got NoneType"),
        (lambda m: _set(m, "weights_sha256", 7), "weights_sha256 must be a string, got int"),
        (lambda m: _set(m, "base_model", "LlamaForCausalLM"), "base_model must be a JSON object, got str"),
        (lambda m: _set(m, "base_model", "model_class", 1), "base_model.model_class must be a string, got int"),
        (lambda m: _set(m, "base_model", "modules", ["q_proj"]), "base_model.modules must be a JSON object, got list"),
        (lambda m: _set(m, "base_model", "modules", {}), "base_model.modules is empty"),
        (lambda m: _set(m, "base_model", "modules", Q0, 32), f"base_model.modules.{Q0} must be a JSON object, got int"),
        (
            lambda m: _set(m, "base_model", "modules", Q0, "in_features", "32"),
            f"base_model.modules.{Q0}.in_features must be an integer, got str",
        ),
        (
            lambda m: _set(m, "base_model", "modules", Q0, "num_experts", True),
            f"base_model.modules.{Q0}.num_experts must be an integer, got bool",
        ),
        (lambda m: _set(m, "runtime", [1.0]), "runtime must be a JSON object, got list"),
    ],
)
def test_missing_or_badly_typed_keys_are_named(tmp_path, saved_meta, edit, message):
    meta = copy.deepcopy(saved_meta)
    edit(meta)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    msg = re.escape(f"{tmp_path / CONFIG_NAME}: {message}")
    with pytest.raises(AdapterError, match=msg):
        read_adapter_config(tmp_path)
    base = make_tiny_llama()
    with pytest.raises(AdapterError, match=msg):
        load_adapter(base, tmp_path)
    assert not list(iter_moe_lora_layers(base))


# ---------------------------------------------------------------- frozen experts (riemix.core.freezing)
def test_frozen_experts_round_trip_and_stay_frozen_for_the_loaded_models_optimizer(tmp_path):
    model = trained_llama(MoELoRAConfig(**CFG))
    names = [name for name, _ in iter_moe_lora_layers(model)]
    freeze_experts(model, {names[0]: [0, 2]}, router=True)
    freeze_experts(model, {names[3]: [1]})
    save_adapter(model, tmp_path)
    masks = {k: v for k, v in load_file(str(tmp_path / WEIGHTS_NAME)).items() if ".frozen_" in k}
    assert set(masks) == {f"{n}.{s}" for n in (names[0], names[3]) for s in ("frozen_experts", "frozen_router_rows")}
    assert masks[f"{names[3]}.frozen_experts"].tolist() == [False, True, False]
    loaded = load_adapter(make_tiny_llama(), tmp_path)
    assert frozen_expert_map(loaded) == {names[0]: [0, 2], names[3]: [1]}
    assert frozen_expert_map(loaded, router=True) == {names[0]: [0, 2]}
    layer = loaded.get_submodule(names[0])
    before = layer.lora_A.detach().clone(), layer.router.weight.detach().clone()
    opt = build_optimizer(loaded, "radamw", lr=0.1, weight_decay=0.1)
    for p in loaded.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(layer.lora_A[[0, 2]], before[0][[0, 2]]) and torch.equal(layer.router.weight[0], before[1][0])
    assert not torch.equal(layer.lora_A[1], before[0][1])


def test_an_adapter_without_frozen_experts_has_no_masks_and_loads_all_unfrozen(tmp_path):
    model = trained_llama(MoELoRAConfig(**CFG))
    save_adapter(model, tmp_path)  # the format of adapters saved before frozen experts existed
    assert not [k for k in load_file(str(tmp_path / WEIGHTS_NAME)) if "frozen" in k]
    base = make_tiny_llama()
    freeze_experts(add_moe_lora(base, MoELoRAConfig(**CFG)), [1])
    remove_moe_lora(base)
    loaded = load_adapter(base, tmp_path)
    assert frozen_expert_map(loaded) == {} and frozen_expert_map(loaded, router=True) == {}


def test_a_bad_saved_frozen_mask_is_named(tmp_path):
    model = trained_llama(MoELoRAConfig(**CFG))
    name = next(n for n, _ in iter_moe_lora_layers(model))
    freeze_experts(model, {name: [1]})
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    tensors[f"{name}.frozen_experts"] = torch.ones(5, dtype=torch.bool)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["weights_sha256"] = hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    base = make_tiny_llama()
    message = rf"{re.escape(name)}\.frozen_experts: a frozen mask must be a bool tensor of shape \(3,\) \(num_experts=3"
    with pytest.raises(AdapterError, match=message):
        load_adapter(base, tmp_path)
    assert not list(iter_moe_lora_layers(base))  # refused before the adapters were added
