"""``riemix train``: the config built from a YAML file and flags, errors, and an end-to-end run then ``riemix eval``."""

from __future__ import annotations

import json

import pytest
import yaml

import riemix.cli.train as train_command
from riemix.cli import build_parser, main
from riemix.core.config import MoELoRAConfig
from riemix.training.config import TrainConfig
from tests.helpers import save_tiny_model_dir


def test_train_builds_the_config_from_the_flags(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(train_command, "train", seen.append)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("lr: 0.01\nmax_steps: 7\nadapter:\n  rank: 8\n  top_k: 1\n")
    argv = ["train", "--config", str(cfg_file), "--max-steps", "3", "--use-rslora", "true",
            "--router-init-std", "0.05", "--experts", "4", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    (cfg,) = seen
    assert (cfg.lr, cfg.max_steps, cfg.progress) == (0.01, 3, False)
    a = cfg.adapter
    assert (a.rank, a.top_k, a.num_experts, a.use_rslora, a.router_init_std) == (8, 1, 4, True, 0.05)
    assert main(["train", "--rank", "3"]) == 0
    assert seen[1].adapter == MoELoRAConfig(rank=3) and seen[1].to_dict() == TrainConfig(adapter={"rank": 3}).to_dict()


def test_train_reports_bad_adapter_values_with_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(train_command, "train", lambda cfg: None)
    assert main(["train", "--experts", "2", "--top-k", "3"]) == 2
    assert "riemix train: error: adapter.top_k must be in 1..num_experts (2), got 3" in capsys.readouterr().err


def test_cli_bad_yaml_and_unknown_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    bad.write_text("learning_rate: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err


def test_train_cli_exposes_the_new_adapter_flags():
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


def test_cli_end_to_end_train_then_eval(tmp_path, mcq_files, capsys):
    model_dir = save_tiny_model_dir(tmp_path)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        f"model: {model_dir}\ndataset: {mcq_files[0]}\neval_dataset: {mcq_files[1]}\n"
        "max_steps: 3\nbatch_size: 4\nlr: 0.01\nadapter:\n  num_experts: 2\n  top_k: 1\n"
    )
    out = tmp_path / "run"
    argv = ["train", "--config", str(cfg_file), "--output-dir", str(out), "--no-progress", "--rank", "2",
            "--max-steps", "2"]  # fmt: skip
    assert main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["adapter"]["rank"] == 2 and saved["adapter"]["num_experts"] == 2
    argv = ["eval", "--model", model_dir, "--adapter", str(out / "adapter"), "--dataset", mcq_files[1],
            "--output", str(tmp_path / "m.json")]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    # eval of the saved adapter (default format, length and split: the run's) reproduces the run's last evaluation
    after = json.loads((out / "summary.json").read_text())["after"]
    assert metrics == {"dataset": metrics["dataset"], "split": "dev", "examples": 48, **after}


def test_cli_resume_without_checkpoint(tmp_path, mcq_files, capsys):
    model_dir = save_tiny_model_dir(tmp_path)
    argv = [
        "train",
        "--model",
        model_dir,
        "--dataset",
        mcq_files[0],
        "--output-dir",
        str(tmp_path / "empty"),
        "--resume",
        "--no-progress",
    ]
    assert main(argv) == 2
    assert "holds no run to continue (no config.yaml); start it without --resume" in capsys.readouterr().err


def _tiny_cli_run(tmp_path, mcq_files, out, *extra):
    model_dir = save_tiny_model_dir(tmp_path)
    argv = ["train", "--model", model_dir, "--dataset", mcq_files[0], "--output-dir", str(out), "--no-progress",
            "--max-steps", "2", "--batch-size", "4", "--experts", "2", "--top-k", "1", "--no-eval-before",
            *extra]  # fmt: skip
    return main(argv)


def test_cli_resume_restores_the_saved_config_and_refuses_unsafe_changes(tmp_path, mcq_files, capsys):
    out = tmp_path / "run"
    assert _tiny_cli_run(tmp_path, mcq_files, out, "--lr", "0.02", "--save-every", "1") == 0
    capsys.readouterr()
    # the README's recipe: only the directory, --resume and a longer run; everything else comes from the run
    assert main(["train", "--output-dir", str(out), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.02 and saved["adapter"]["num_experts"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens_per_s"] > 0
    assert main(["train", "--output-dir", str(out), "--resume", "--lr", "0.1", "--rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "adapter.rank: 4 in the run, 8 now; lr: 0.02 in the run, 0.1 now" in err
    assert _tiny_cli_run(tmp_path, mcq_files, out) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _tiny_cli_run(tmp_path, mcq_files, out, "--overwrite") == 0


def test_cli_divergence_exits_3_without_a_non_finite_adapter(tmp_path, mcq_files, capsys):
    out = tmp_path / "run"
    assert _tiny_cli_run(tmp_path, mcq_files, out, "--lr", "1e30", "--optimizer", "sgd") == 3
    err = capsys.readouterr().err
    assert "riemix train: error: training diverged at step 1" in err and "try a lower lr (now 1e+30)" in err
    assert not (out / "adapter").exists()


def test_cli_reports_a_full_disk_naming_the_file_and_the_free_space(monkeypatch, capsys, tmp_path):
    import errno

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(train_command, "train", full)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'run' / 'metrics.jsonl'}: No space left on device (" in err
    assert f"MiB free on {tmp_path})" in err
