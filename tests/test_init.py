"""Initialisations (zero_b, gaussian, orthogonal, pissa, small_b + warm-up) and ``riemix check-init``."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny import make_tiny_llama, tiny_inputs
from torch import nn

from riemix import (
    MoELoRAConfig,
    MoELoRALinear,
    add_moe_lora,
    iter_moe_lora_layers,
    load_adapter,
    save_adapter,
)
from riemix.cli import main
from riemix.core.init import initial_gates
from riemix.core.schedules import set_scale_progress

F64 = torch.float64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def logits(model):
    return model(**tiny_inputs()).logits


@pytest.mark.parametrize("init", ["zero_b", "gaussian", "orthogonal"])
def test_zero_b_like_inits_leave_outputs_unchanged_exactly(init):
    model = make_tiny_llama()
    before = logits(model)
    add_moe_lora(model, MoELoRAConfig(num_experts=3, top_k=2, rank=2, init=init, target_modules=TARGETS))
    assert torch.equal(logits(model), before)
    for _, layer in iter_moe_lora_layers(model):
        assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().max() > 0


def test_orthogonal_joint_rows_are_mutually_orthonormal():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 8).double(), 4, 3, alpha=8.0, top_k=2, init="orthogonal")
    a_all = layer.lora_A.reshape(12, 16)  # E·r = 12 <= in = 16
    assert layer.init_info == "joint"
    torch.testing.assert_close(a_all @ a_all.t(), torch.eye(12, dtype=F64), atol=1e-12, rtol=0)


def test_orthogonal_falls_back_per_expert_and_says_so(caplog):
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 8).double(), 4, 3, alpha=8.0, top_k=2, init="orthogonal")
    assert layer.init_info == "per_expert"  # E·r = 12 > in = 8
    for i in range(4):
        torch.testing.assert_close(layer.lora_A[i] @ layer.lora_A[i].t(), torch.eye(3, dtype=F64), atol=1e-12, rtol=0)
    with caplog.at_level(logging.WARNING, logger="riemix"):
        add_moe_lora(make_tiny_llama(), MoELoRAConfig(num_experts=8, top_k=2, rank=8, init="orthogonal"))
    assert sum("orthonormal per expert only" in r.message for r in caplog.records) == 1  # once per call


PISSA_ROUTINGS = {
    "dense": dict(routing="dense", num_experts=3, top_k=3),
    "softmax_topk": dict(routing="softmax_topk", num_experts=4, top_k=2),
    "topk_softmax_k1": dict(routing="topk_softmax", num_experts=3, top_k=1),
    "top_p": dict(routing="top_p", num_experts=4, top_k=3, top_p=0.6),
    "global_scales": dict(routing="global", num_experts=3, top_k=1, expert_scales=True),
}


@pytest.mark.parametrize("name", list(PISSA_ROUTINGS))
def test_pissa_preserves_outputs_at_step_0(name):
    model = make_tiny_llama(dtype=F64)
    before = logits(model)
    cfg = MoELoRAConfig(rank=2, alpha=8.0, init="pissa", target_modules=TARGETS, **PISSA_ROUTINGS[name])
    add_moe_lora(model, cfg)
    torch.testing.assert_close(logits(model), before, atol=1e-11, rtol=1e-11)
    model.train()  # no dropout, no noise: training mode is preserved too
    torch.testing.assert_close(logits(model), before, atol=1e-11, rtol=1e-11)


def test_pissa_factors_are_the_principal_directions():
    torch.manual_seed(0)
    base = nn.Linear(10, 9).double()
    w = base.weight.detach().clone()
    layer = MoELoRALinear(base, 4, 2, alpha=6.0, top_k=2, routing="softmax_topk", init="pissa")
    g0 = initial_gates(layer)
    assert g0.tolist() == [0.5, 0.5, 0.0, 0.0]  # zero router: ties go to the lowest indices
    assert torch.count_nonzero(layer.router.weight) == 0
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    selected = [i for i in range(4) if g0[i] > 0]
    # the selected experts hold the top k·r = 4 directions: s·g⁰·Σ BᵢAᵢ = U₄S₄V₄ᵀ
    delta = sum(layer.scaling * g0[i] * layer.lora_B[i] @ layer.lora_A[i] for i in selected)
    torch.testing.assert_close(delta, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight, w - delta, atol=1e-12, rtol=0)
    # unselected experts: B = 0, A = the next principal directions (their span), which stay in W
    others = [i for i in range(4) if g0[i] == 0]
    for i in others:
        assert torch.count_nonzero(layer.lora_B[i]) == 0
    a_rest = torch.cat([layer.lora_A[i] for i in others])  # (4, in)
    proj = vh[4:8].t() @ vh[4:8]
    torch.testing.assert_close(a_rest @ proj, a_rest, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="already carries a PiSSA residual"):
        layer.reset_adapter_parameters("pissa")


def test_pissa_save_load_reproduces_trained_model_exactly(tmp_path):
    cfg = MoELoRAConfig(num_experts=3, top_k=2, rank=2, init="pissa", target_modules=TARGETS, expert_scales=True)
    model = add_moe_lora(make_tiny_llama(), cfg)
    torch.manual_seed(5)
    with torch.no_grad():  # "training": move every adapter parameter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter(model, tmp_path / "pissa")
    restored = load_adapter(make_tiny_llama(), tmp_path / "pissa")
    for (name, a), (_, b) in zip(iter_moe_lora_layers(model), iter_moe_lora_layers(restored), strict=True):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight), name  # residual rebuilt bit-exactly
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    assert torch.equal(logits(restored), logits(model))


def test_pissa_with_more_directions_than_rank_keeps_every_expert_trainable():
    torch.manual_seed(0)
    base = nn.Linear(4, 3).double()
    w = base.weight.detach().clone()
    x = torch.randn(5, 4, dtype=F64)
    want = base(x)
    layer = MoELoRALinear(base, 3, 2, alpha=4.0, top_k=3, routing="dense", init="pissa")  # E·r = 6 > 3
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)
    assert all(layer.lora_A[i].abs().sum() > 0 for i in range(3))
    torch.testing.assert_close(layer.base_layer.weight, torch.zeros_like(w), atol=1e-12, rtol=0)  # full rank moved


def test_small_b_with_scale_warmup_starts_at_the_base_model():
    model = make_tiny_llama()
    before = logits(model)
    cfg = MoELoRAConfig(
        num_experts=3,
        top_k=2,
        rank=2,
        init="small_b",
        init_b_std=0.05,
        scale_warmup_steps=4,
        target_modules=TARGETS,
    )
    add_moe_lora(model, cfg)
    stds = torch.cat([layer.lora_B.flatten() for _, layer in iter_moe_lora_layers(model)]).std()
    assert 0.04 < stds < 0.06
    assert torch.equal(logits(model), before)  # factor 0 at step 0
    set_scale_progress(model, 2)
    half = logits(model)
    assert not torch.allclose(half, before)
    set_scale_progress(model, 0)
    assert torch.equal(logits(model), before)  # a pure function of the step


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"init_b_std": 0.0}, r"init_b_std must be > 0, got 0.0"),
        ({"scale_warmup_steps": -1}, r"scale_warmup_steps must be an int >= 0, got -1"),
        ({"scale_warmup_steps": 1.5}, r"scale_warmup_steps must be an int >= 0, got 1.5"),
        (
            {"init": "pissa", "scale_warmup_steps": 3},
            r"scale_warmup_steps must be 0 with init='pissa'.*got 3",
        ),
        ({"router_temperature": 0.0}, r"router_temperature must be > 0, got 0.0"),
        ({"router_temperature_final": -1.0}, r"router_temperature_final must be > 0 or None, got -1.0"),
        ({"router_noise_std": -0.1}, r"router_noise_std must be >= 0, got -0.1"),
        ({"routing": "dense", "router_noise_std": 0.1}, r"router_noise_std must be 0 with routing='dense'"),
        ({"routing": "global", "router_noise_std": 0.1}, r"router_noise_std must be 0 with routing='global'"),
        ({"routing": "top_p", "top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"expert_scales": 1}, r"expert_scales must be a bool, got 1"),
        ({"scale_anchor_beta": -1.0}, r"scale_anchor_beta must be >= 0, got -1.0"),
        ({"scale_anchor_beta": 0.1}, r"scale_anchor_beta needs expert_scales=True"),
        ({"routing": "top_p", "num_experts": 2, "top_k": 3}, r"top_k must be in 1..num_experts \(2\), got 3"),
    ],
)
def test_new_config_fields_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELoRAConfig(**kwargs)


def test_new_config_fields_round_trip_and_global_ignores_top_k_bound():
    cfg = MoELoRAConfig(
        num_experts=2,
        top_k=4,
        routing="global",
        expert_scales=True,
        scale_anchor_beta=0.1,
        router_temperature=2.0,
        router_temperature_final=0.5,
        init="small_b",
        init_b_std=0.01,
        scale_warmup_steps=5,
    )
    assert MoELoRAConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- riemix check-init
def tiny_model_dir(tmp_path):
    from test_train import tiny_tokenizer

    model_dir = tmp_path / "tiny-model"
    make_tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return str(model_dir)


COMMON = ["--experts", "3", "--top-k", "2", "--rank", "2", "--max-new-tokens", "4"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--init", "zero_b"],
        ["--init", "orthogonal"],
        ["--init", "pissa"],
        ["--init", "pissa", "--routing", "global", "--expert-scales"],
        ["--init", "small_b", "--scale-warmup-steps", "10"],
    ],
)
def test_check_init_passes_for_output_preserving_inits(tmp_path, flags, capsys):
    out = tmp_path / "res.json"
    assert main(["check-init", tiny_model_dir(tmp_path), *COMMON, *flags, "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["kl_mean"] <= 1e-6 and res["ok"]
    assert res["ppl_adapted"] == pytest.approx(res["ppl_base"], rel=1e-5)
    assert all(g["identical"] for g in res["generations"])
    assert "mean KL(base || adapted)" in capsys.readouterr().out


def test_check_init_fails_without_warmup(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("apple pear plum fig what is tasty\n\nthe best pick today here\n")
    args = [
        "check-init",
        tiny_model_dir(tmp_path),
        *COMMON,
        "--init",
        "small_b",
        "--init-b-std",
        "0.5",
        "--text-file",
        str(text),
        "--output",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 1
    assert "exceeds" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["kl_mean"] > 1e-4


def test_check_init_on_a_run_directory(tmp_path):
    from test_train import tiny_tokenizer, write_mcq

    from riemix.training.recipe import TrainConfig, train

    cfg = TrainConfig.from_dict(
        dict(
            model=tiny_model_dir(tmp_path),
            dataset=write_mcq(tmp_path / "tr.jsonl", 16, 0),
            batch_size=4,
            max_steps=2,
            eval_before=False,
            progress=False,
            verbose=False,
            output_dir=str(tmp_path / "run"),
            lr=1e-2,
            adapter={
                "num_experts": 2,
                "top_k": 1,
                "rank": 2,
                "init": "small_b",
                "scale_warmup_steps": 5,
                "routing": "global",
                "expert_scales": True,
                "scale_anchor_beta": 0.1,
            },
        )
    )
    train(cfg, model=make_tiny_llama(), tokenizer=tiny_tokenizer())
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert meta["runtime"]["scale_factor"] == pytest.approx(2 / 5)  # warm-up state after 2 of 5 steps
    assert main(["check-init", str(tmp_path / "run"), "--max-new-tokens", "2"]) == 0
    assert main(["check-init", str(tmp_path / "run"), "--trained", "--max-new-tokens", "2", "--threshold", "0"]) == 1
    with pytest.raises(SystemExit):
        main(["check-init"])


def test_train_cli_exposes_the_new_adapter_flags():
    from riemix.cli import build_parser

    ns = build_parser().parse_args(
        ["train", "--init", "small_b", "--scale-warmup-steps", "5", "--expert-scales", "true",
         "--router-temperature-final", "0.5", "--routing", "top_p", "--top-p", "0.7"]
    )  # fmt: skip
    assert (ns.init, ns.scale_warmup_steps, ns.expert_scales, ns.router_temperature_final, ns.top_p) == (
        "small_b",
        5,
        True,
        0.5,
        0.7,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--expert-scales", "maybe"])


def test_resume_with_scale_warmup_and_temperature_decay_is_bit_identical(tmp_path):
    import shutil

    from test_train import tiny_tokenizer, write_mcq

    from riemix.training.recipe import TrainConfig, train

    data = write_mcq(tmp_path / "tr.jsonl", 32, 0)

    def cfg(out, **kw):
        return TrainConfig.from_dict(dict(
            model="tiny", dataset=data, batch_size=4, max_steps=6, save_every=3, keep_last=5,
            eval_before=False, progress=False, verbose=False, output_dir=str(out), lr=1e-2, **kw,
            adapter={"num_experts": 3, "top_k": 2, "rank": 2, "init": "small_b", "init_b_std": 0.01,
                     "scale_warmup_steps": 4, "router_temperature": 2.0, "router_temperature_final": 0.5},
        ))  # fmt: skip

    train(cfg(tmp_path / "straight"), model=make_tiny_llama(), tokenizer=tiny_tokenizer())
    step3 = "checkpoints/step-000003"
    shutil.copytree(tmp_path / "straight" / step3, tmp_path / "resumed" / step3)
    train(cfg(tmp_path / "resumed", resume=True), model=make_tiny_llama(), tokenizer=tiny_tokenizer())
    a = load_adapter(make_tiny_llama(), tmp_path / "straight/adapter")
    b = load_adapter(make_tiny_llama(), tmp_path / "resumed/adapter")
    for (name, la), (_, lb) in zip(iter_moe_lora_layers(a), iter_moe_lora_layers(b), strict=True):
        assert torch.equal(la.lora_A, lb.lora_A) and torch.equal(la.lora_B, lb.lora_B), name
        state = (la.scale_factor, la.router_temperature)
        assert state == (lb.scale_factor, lb.router_temperature) == (1.0, 0.5)
