"""Adapters and checkpoints of grown models: other expert counts per layer, mixed ranks, maturity state."""

from __future__ import annotations

import json

import pytest
import torch

import riemix
from riemix import MoELoRAConfig, add_moe_lora, build_optimizer, load_adapter, save_adapter
from riemix.core.schedules import advance_maturity, set_maturity
from riemix.core.state import adapter_state_dict
from riemix.core.tuner import iter_moe_lora_layers
from riemix.io.adapter import AdapterError, read_adapter_config
from riemix.io.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import lm_steps, make_tiny_llama, tiny_inputs

Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def grown_model(**cfg):
    """Trained, then grown unevenly: 2 experts in block 0, 3 in block 1, one rank-8 and one rank-1 expert added."""
    model = make_tiny_llama()
    config = MoELoRAConfig(num_experts=[2, 3], top_k=1, rank=4, routing="softmax_topk", **cfg)
    add_moe_lora(model, config)
    opt = build_optimizer(model, "radamw", lr=1e-3)
    lm_steps(model, opt, range(2), advance_maturity)
    riemix.grow_experts(model, opt, rank=8, modules=[Q0])
    riemix.grow_experts(model, opt, rank=1, modules=[Q0, V1])
    riemix.grow_experts(model, opt, modules=[V1])
    lm_steps(model, opt, range(2, 4), advance_maturity)
    return model, opt


def assert_same_adapter(model, other):
    want, got = adapter_state_dict(model), adapter_state_dict(other)
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert value.dtype == got[key].dtype and torch.equal(value, got[key]), key
    inputs = tiny_inputs(seed=9)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, other(**inputs).logits)


def test_a_grown_mixed_rank_adapter_round_trips_bit_exactly(tmp_path):
    model, _ = grown_model()
    layers = dict(iter_moe_lora_layers(model))
    assert layers[Q0].expert_ranks == [4, 4, 8, 1] and layers[V1].expert_ranks == [4, 4, 4, 1, 4]
    save_adapter(model, tmp_path / "adapter")
    modules = read_adapter_config(tmp_path / "adapter")["base_model"]["modules"]
    assert modules[Q0]["expert_ranks"] == [4, 4, 8, 1] and modules[Q0]["rank"] == 8
    assert "expert_ranks" not in modules["model.layers.0.self_attn.k_proj"]  # uniform: as before
    loaded = load_adapter(make_tiny_llama(), tmp_path / "adapter")
    assert_same_adapter(model, loaded)
    for name, layer in iter_moe_lora_layers(loaded):
        assert (layer.expert_ranks, layer.scaling) == (layers[name].expert_ranks, layers[name].scaling)


def test_a_callable_rank_round_trips(tmp_path):
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, rank=lambda i: 2 + 2 * i))
    riemix.grow_experts(model, rank=3, modules=[V1])
    save_adapter(model, tmp_path / "adapter")
    assert read_adapter_config(tmp_path / "adapter")["config"]["rank"] is None
    loaded = load_adapter(make_tiny_llama(), tmp_path / "adapter")
    assert loaded.moe_lora_config.rank == [2, 4]
    assert dict(iter_moe_lora_layers(loaded))[V1].expert_ranks == [4, 4, 3]
    assert_same_adapter(model, loaded)


def test_an_adapter_without_growth_or_maturity_is_written_as_before(tmp_path):
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, rank=2))
    save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not {"mature_after_steps", "maturity_temperature", "maturity_anneal_steps"} & set(meta["config"])
    for info in meta["base_model"]["modules"].values():
        assert set(info) == {"in_features", "out_features", "num_experts", "rank", "weight_sha256", "weight_dtype"}
    from safetensors.torch import load_file

    suffixes = {key.rsplit(".", 1)[-1] for key in load_file(tmp_path / "adapter" / "adapter_model.safetensors")}
    assert suffixes == {"lora_A", "lora_B", "weight"}


def test_maturity_survives_save_and_load(tmp_path):
    model, _ = grown_model(mature_after_steps=3, maturity_temperature=2.0)
    layers = dict(iter_moe_lora_layers(model))
    assert layers[Q0].expert_ages == [4, 4, 2, 2] and layers[Q0].routing_now().mode == "dense"
    assert layers["model.layers.0.self_attn.k_proj"].routing_now().mode == "softmax_topk"
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(make_tiny_llama(), tmp_path / "adapter")
    for name, layer in iter_moe_lora_layers(loaded):
        assert layer.expert_ages == layers[name].expert_ages
        assert layer.routing_now() == layers[name].routing_now()
    assert_same_adapter(model, loaded)
    advance_maturity(loaded, 10)
    assert dict(iter_moe_lora_layers(loaded))[Q0].routing_now().mode == "softmax_topk"  # 3 steps old now


def test_maturity_turned_on_later_is_saved_through_the_config(tmp_path):
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, rank=2))
    set_maturity(model, 5)
    riemix.grow_experts(model, modules=[Q0])
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(make_tiny_llama(), tmp_path / "adapter")
    layer = dict(iter_moe_lora_layers(loaded))[Q0]
    assert layer.expert_ages == [5, 5, 0] and layer.routing_now().immature == 1


def test_a_checkpoint_of_a_grown_model_round_trips_bit_exactly(tmp_path):
    model, opt = grown_model(mature_after_steps=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    path = save_checkpoint(tmp_path, 4, model, opt, sched, {})
    fresh = load_adapter(make_tiny_llama(), path / "adapter")
    for _, layer in iter_moe_lora_layers(fresh):
        layer.expert_age.zero_()  # the checkpoint restores the ages itself
    opt2 = build_optimizer(fresh, "radamw", lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 1.0)
    assert load_checkpoint(path, fresh, opt2, sched2)["step"] == 4
    assert_same_adapter(model, fresh)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, q in zip(params, [q for g in opt2.param_groups for q in g["params"]], strict=True):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(opt2.state[q][key], value) if torch.is_tensor(value) else opt2.state[q][key] == value
    lm_steps(model, opt, [4], advance_maturity)
    lm_steps(fresh, opt2, [4], advance_maturity)
    assert_same_adapter(model, fresh)


@pytest.mark.parametrize("ranks", [[4, 4], [4, 0, 4], [3, 3, 2], "4"])
def test_bad_expert_ranks_in_an_adapter_config_are_refused(tmp_path, ranks):
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=3, top_k=1, rank=4))
    save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["base_model"]["modules"][Q0]["expert_ranks"] = ranks
    path.write_text(json.dumps(meta))
    match = rf"base_model.modules.{Q0}.expert_ranks must list num_experts=3 ints >= 1 whose maximum is rank=4"
    with pytest.raises(AdapterError, match=match):
        read_adapter_config(tmp_path / "adapter")
