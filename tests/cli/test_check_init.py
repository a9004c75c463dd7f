"""``riemix check-init``: output-preserving initialisations pass, an unwarmed small_b fails, run directories."""

from __future__ import annotations

import json

import pytest

from riemix.cli import main
from tests.helpers import save_tiny_model_dir, tiny_train_cfg, train_tiny, write_mcq

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
    assert main(["check-init", save_tiny_model_dir(tmp_path), *COMMON, *flags, "--output", str(out)]) == 0
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
        save_tiny_model_dir(tmp_path),
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
    cfg = tiny_train_cfg(
        tmp_path / "run",
        write_mcq(tmp_path / "tr.jsonl", 16, 0),
        model=save_tiny_model_dir(tmp_path),
        batch_size=4,
        max_steps=2,
        eval_before=False,
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
    train_tiny(cfg)
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert meta["runtime"]["scale_factor"] == pytest.approx(2 / 5)  # warm-up state after 2 of 5 steps
    assert main(["check-init", str(tmp_path / "run"), "--max-new-tokens", "2"]) == 0
    assert main(["check-init", str(tmp_path / "run"), "--trained", "--max-new-tokens", "2", "--threshold", "0"]) == 1
    with pytest.raises(SystemExit):
        main(["check-init"])
