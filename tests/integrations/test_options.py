"""``RiemixOptions`` validation and ``riemix_optimizer`` (optimizer groups and schedule for ``Trainer``)."""

from __future__ import annotations

import math

import pytest

from riemix.core.regularizers import REGULARIZERS
from riemix.integrations import RiemixOptions, riemix_optimizer
from tests.helpers import make_tiny_llama
from tests.integrations.common import adapted_llama


def test_defaults_are_the_clis():
    from riemix.training.config import TrainConfig

    options, cli = RiemixOptions(), TrainConfig()
    for name in ("optimizer", "gate_lr", "loraplus_ratio", "reg", "gate_max_grad_norm", "regularizer_mode"):
        assert getattr(options, name) == getattr(cli, name), name
    assert options.coefs() == cli.regularizer_coefs() == dict.fromkeys(REGULARIZERS, 0.0)


def test_coefs_fill_in_the_regularisers_that_are_off():
    coefs = RiemixOptions(regularizers={"z_loss": 1}).coefs()
    assert coefs["z_loss"] == 1.0 and isinstance(coefs["z_loss"], float)
    assert sum(coefs.values()) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regularizers": [("z_loss", 1.0)]}, r"regularizers must be a mapping \{name: coefficient\}"),
        ({"regularizers": {"balance": 1.0}}, r"unknown regulariser\(s\) \['balance'\]; valid: \['load_balance'"),
        ({"regularizers": {"z_loss": -1.0}}, r"regularizers\['z_loss'\] must be a finite number >= 0, got -1.0"),
        ({"regularizers": {"z_loss": math.nan}}, r"regularizers\['z_loss'\] must be a finite number >= 0, got nan"),
        ({"regularizers": {"z_loss": True}}, r"regularizers\['z_loss'\] must be a finite number >= 0, got True"),
        ({"regularizer_mode": "grad"}, r"regularizer_mode must be one of \('loss', 'inject'\), got 'grad'"),
        ({"diagnostics_every": -1}, "diagnostics_every must be an int >= 0, got -1"),
        ({"diagnostics_every": 2.0}, "diagnostics_every must be an int >= 0, got 2.0"),
        ({"optimizer": "adam"}, r"optimizer must be one of \('adamw', 'radamw', 'rsgd', 'sgd'\), got 'adam'"),
        ({"gate_lr": -1e-3}, "gate_lr must be a finite number >= 0 or None, got -0.001"),
        ({"loraplus_ratio": 0}, "loraplus_ratio must be a finite number > 0, got 0"),
        ({"reg": math.inf}, "reg must be a finite number >= 0, got inf"),
        ({"gate_max_grad_norm": 0.0}, "gate_max_grad_norm must be a finite number > 0 or None, got 0.0"),
    ],
)
def test_options_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RiemixOptions(**kwargs)


def test_optimizer_name_is_case_insensitive():
    assert RiemixOptions(optimizer="RAdamW").optimizer == "RAdamW"


def test_riemix_optimizer_groups_and_schedule():
    model = adapted_llama()
    opt, sched = riemix_optimizer(model, 1e-2, 10, gate_lr=1e-3, loraplus_ratio=4.0, warmup_steps=2)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"lora_A", "lora_B", "router", "other"}  # other: the expert scales
    assert type(opt).__name__ == "RiemannianAdamW" and groups["router"]["max_grad_norm"] == 1.0
    lrs = []
    for _ in range(10):
        lrs.append({name: g["lr"] for name, g in zip(groups, opt.param_groups, strict=True)})
        opt.step()
        sched.step()
    assert [lr["lora_A"] for lr in lrs[:3]] == pytest.approx([5e-3, 1e-2, 1e-2])
    assert lrs[2]["lora_B"] == pytest.approx(4e-2) and lrs[2]["router"] == pytest.approx(1e-3)
    assert lrs[9]["lora_A"] == pytest.approx(1e-2 * 1 / 8)  # linear decay to 0 at step 10
    _, constant = riemix_optimizer(model, 1e-2, 10, schedule="constant")
    assert constant.lr_lambdas[0](9) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_steps": 0}, "max_steps must be an int >= 1, got 0"),
        ({"max_steps": 10.0}, "max_steps must be an int >= 1, got 10.0"),
        ({"warmup_steps": -1}, "warmup_steps must be an int >= 0, got -1"),
        ({"schedule": "cosine"}, r"schedule must be one of \('linear', 'constant'\), got 'cosine'"),
        ({"optimizer": "lion"}, "Unknown optimizer 'lion'"),
    ],
)
def test_riemix_optimizer_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        riemix_optimizer(adapted_llama(), **{"lr": 1e-2, "max_steps": 10, **kwargs})


def test_riemix_optimizer_refuses_a_model_without_adapters():
    with pytest.raises(ValueError, match="model has no MoE-LoRA layers; call add_moe_lora first"):
        riemix_optimizer(make_tiny_llama(), 1e-2, 10)
