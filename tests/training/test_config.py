"""TrainConfig: validation messages, the typed adapter with its YAML round trip, docs and example configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from riemix import MoELoRAConfig
from riemix.training.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, r"lr must be >= 0 and finite, got -1.0"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"max_steps": 0}, r"max_steps must be an int >= 1, got 0"),
        ({"lr": float("inf")}, r"lr must be >= 0 and finite, got inf"),
        ({"weight_decay": float("inf")}, r"weight_decay must be >= 0 and finite, got inf"),
        ({"loraplus_ratio": float("inf")}, r"loraplus_ratio must be > 0 and finite, got inf"),
        ({"divergence_loss_ratio": 1.0}, r"divergence_loss_ratio must be a finite number > 1 or null, got 1.0"),
        ({"resume": True, "overwrite": True}, r"resume and overwrite exclude each other"),
        ({"format": "mc"}, r"format must be 'cloze' or 'letter', got 'mc'"),
        ({"schedule": "cosine"}, r"schedule must be 'linear' or 'constant', got 'cosine'"),
        ({"optimizer": "lion"}, r"optimizer must be one of adamw, radamw, rsgd, sgd, got 'lion'"),
        ({"model_kind": "seq2seq"}, r"model_kind must be"),
        ({"train_subset": 0}, r"train_subset must be an int >= 1 or null, got 0"),
        ({"gate_lr": -1.0}, r"gate_lr must be >= 0 and finite, or null, got -1.0"),
        ({"loraplus_ratio": 0.0}, r"loraplus_ratio must be > 0 and finite, got 0.0"),
        ({"gate_max_grad_norm": 0.0}, r"gate_max_grad_norm must be > 0 or null, got 0.0"),
        ({"max_length": 4}, r"max_length must be >= 8, got 4"),
        ({"adapter": {"top_k": 99}}, r"adapter.top_k must be in 1..num_experts"),
        ({"adapter": {"experts": 3}}, r"adapter: .*unexpected keyword argument 'experts'"),
        ({"bogus": 1}, r"config: unknown option\(s\) \['bogus'\]"),
        ({"diagnostics_every": -1}, r"diagnostics_every must be an int >= 0, got -1"),
        ({"uniform_prior_coef": -0.1}, r"uniform_prior_coef must be >= 0 and finite, got -0.1"),
        ({"diversity_coef": -1.0}, r"diversity_coef must be >= 0 and finite, got -1.0"),
        ({"orthogonality_coef": float("nan")}, r"orthogonality_coef must be >= 0 and finite, got nan"),
        ({"regularizer_mode": "grad"}, r"regularizer_mode must be 'loss' or 'inject', got 'grad'"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(kwargs)


def test_train_config_adapter_is_a_typed_config_with_dict_round_trip(tmp_path):
    assert TrainConfig().adapter == MoELoRAConfig()  # the default job's adapter is MoELoRAConfig's defaults
    # the old config.yaml form: a partial adapter mapping, merged over the defaults
    old = tmp_path / "old.yaml"
    old.write_text("max_steps: 3\nadapter:\n  num_experts: 4\n  rank: 2\n  routing: dense\n")
    cfg = TrainConfig.from_yaml(old, {"adapter": {"rank": 8}})
    assert isinstance(cfg.adapter, MoELoRAConfig)
    assert (cfg.adapter.num_experts, cfg.adapter.rank, cfg.adapter.routing, cfg.adapter.top_k) == (4, 8, "dense", 2)
    data = cfg.to_dict()
    assert type(data["adapter"]) is dict and data["adapter"] == MoELoRAConfig(**data["adapter"]).to_dict()
    assert data["adapter"]["rank"] == 8 and data["adapter"]["init"] == "zero_b"
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(saved) == cfg
    assert TrainConfig(adapter=cfg.adapter).adapter is cfg.adapter
    with pytest.raises(ValueError, match=r"adapter must be a MoELoRAConfig or a mapping of its fields, got 3"):
        TrainConfig(adapter=3)


def test_train_config_documents_every_field():
    doc = TrainConfig.__doc__
    for f in dataclasses.fields(TrainConfig):
        assert f"\n        {f.name}: " in doc, f.name


@pytest.mark.parametrize("name", ["paper.yaml", "fast_cpu.yaml", "minilm_glue.yaml"])
def test_example_configs_are_valid(name):
    path = CONFIGS / name
    cfg = TrainConfig.from_yaml(path)
    data, written = cfg.to_dict(), yaml.safe_load(path.read_text())
    assert written and set(written) <= set(data)
    for key, value in written.items():  # every option the file sets reaches the config unchanged
        if key == "adapter":
            assert {k: data["adapter"][k] for k in value} == value
        else:
            assert data[key] == value, key
    assert cfg.max_steps == written.get("max_steps", TrainConfig().max_steps) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bf16": "false"}, r"bf16 must be a bool, got 'false'"),
        ({"lr": "1e-3"}, r"lr must be a number, got '1e-3'"),
        ({"max_steps": True}, r"max_steps must be an int, got True"),
        ({"optimizer": 5}, r"optimizer must be a string, got 5"),
        ({"resume": 3}, r"resume must be a bool or a string, got 3"),
    ],
)
def test_python_api_types_are_strict_and_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_yaml_reads_exponent_numbers_but_not_truthy_strings(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("lr: 1e-3\ngate_lr: 2E-5\nadapter:\n  alpha: 3e1\nbf16: false\n")  # PyYAML: "1e-3" is a str
    cfg = TrainConfig.from_yaml(good)
    assert cfg.lr == 1e-3 and cfg.gate_lr == 2e-5 and cfg.adapter.alpha == 30.0 and cfg.bf16 is False
    bad = tmp_path / "bad.yaml"
    bad.write_text('bf16: "false"\n')
    with pytest.raises(ValueError, match=r"bad\.yaml: bf16 must be a bool, got 'false'"):
        TrainConfig.from_yaml(bad)
    bad.write_text("lr: abc\n")
    with pytest.raises(ValueError, match=r"lr must be a number, got 'abc'"):
        TrainConfig.from_yaml(bad)
    bad.write_text("adapter:\n  use_rslora: 'no'\n")
    with pytest.raises(ValueError, match=r"adapter\.use_rslora must be a bool, got 'no'"):
        TrainConfig.from_yaml(bad)


@pytest.mark.parametrize(
    ("adapter", "match"),
    [
        ({"alpha": "16"}, r"^adapter\.alpha must be a number, got '16'$"),
        ({"alpha": float("inf")}, r"^adapter\.alpha must be finite, got inf$"),
        ({"init_b_std": float("nan")}, r"^adapter\.init_b_std must be finite, got nan$"),
        ({"router_init_std": float("inf")}, r"^adapter\.router_init_std must be finite, got inf$"),
    ],
)
def test_adapter_strings_and_non_finite_numbers_name_the_field(adapter, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(adapter=adapter)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"alpha": 8.0}, r"unknown option\(s\) \['alpha'\] \(alpha is an adapter option: write it under adapter:"),
        ({"learning_rat": 0.1}, r"unknown option\(s\) \['learning_rat'\]; valid"),
        ({"max_step": 3}, r"\(did you mean 'max_steps' for 'max_step'\?\)"),
    ],
)
def test_unknown_options_get_a_hint(data, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(data)
