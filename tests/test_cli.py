"""The ``riemix`` command line: generated flags, help lines, adapter flags, ``python -m riemix``, errors.

The subcommands' end-to-end runs are in test_train.py (train, eval), test_init.py (check-init) and
test_inspect.py (inspect).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

import riemix.cli.eval as eval_command
import riemix.cli.train as train_command
from riemix.cli import build_parser, flags, main
from riemix.core.config import INIT_MODES, ROUTING_MODES, MoELoRAConfig
from riemix.diagnostics.check_init import check_init
from riemix.optim import OPTIMIZER_NAMES
from riemix.training.config import TrainConfig

#: The adapter flags of the first command line (flag -> MoELoRAConfig field), plus the two it lacked.
ADAPTER_FLAGS = {
    "--experts": "num_experts",
    "--top-k": "top_k",
    "--rank": "rank",
    "--alpha": "alpha",
    "--dropout": "dropout",
    "--target-modules": "target_modules",
    "--routing": "routing",
    "--gate-grad-power": "gate_grad_power",
    "--init": "init",
    "--init-b-std": "init_b_std",
    "--scale-warmup-steps": "scale_warmup_steps",
    "--router-temperature": "router_temperature",
    "--router-temperature-final": "router_temperature_final",
    "--router-noise-std": "router_noise_std",
    "--top-p": "top_p",
    "--expert-scales": "expert_scales",
    "--scale-anchor-beta": "scale_anchor_beta",
    "--use-rslora": "use_rslora",
    "--router-init-std": "router_init_std",
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


# ---------------------------------------------------------------- docstring parsing
def test_docstring_entries_joins_continuations_and_stops_at_the_next_section():
    doc = """Summary.

    Attributes:
        alpha: First line
            second line.
        beta (int): One line.

    Returns:
        gamma: not an attribute.
    """
    assert flags.docstring_entries(doc, "Attributes") == {"alpha": "First line second line.", "beta": "One line."}
    assert flags.docstring_entries(doc, "Args") == {}
    assert flags.docstring_entries(None, "Args") == {}


@pytest.mark.parametrize("cls", [TrainConfig, MoELoRAConfig])
def test_every_config_field_is_documented(cls):
    docs = flags.docstring_entries(cls.__doc__, "Attributes")
    assert [f.name for f in dataclasses.fields(cls)] == list(docs)
    assert all(text.strip() for text in docs.values())


# ---------------------------------------------------------------- generated options
def test_every_option_of_every_subcommand_has_a_help_line_and_its_own_dest():
    subs = subparsers()
    assert set(subs) == {"train", "eval", "inspect", "check-init"}
    for name, parser in subs.items():
        actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        for action in actions:
            assert action.help and action.help.strip(), (name, action.option_strings or action.dest)
        dests = [a.dest for a in actions]
        assert len(dests) == len(set(dests)), name


def test_train_has_a_flag_for_every_config_field():
    opts = options(subparsers()["train"])
    for f in dataclasses.fields(TrainConfig):
        if f.name != "adapter":
            assert opts["--" + f.name.replace("_", "-")].dest == f.name
    for flag, field in ADAPTER_FLAGS.items():
        assert opts[flag].dest == field
    assert {a.dest for a in opts.values()} >= {f.name for f in dataclasses.fields(MoELoRAConfig)}


def test_help_line_default_and_choices_come_from_the_config():
    opts = options(subparsers()["train"])
    rank_doc = flags.docstring_entries(MoELoRAConfig.__doc__, "Attributes")["rank"]
    assert opts["--rank"].help == f"{rank_doc} (default: 4)"
    assert opts["--target-modules"].help.endswith("(default: q_proj k_proj v_proj o_proj)")
    assert opts["--lr"].help.endswith("(default: 0.001)")
    assert opts["--eval-before"].help.endswith("(default: true)")
    assert tuple(opts["--routing"].choices) == ROUTING_MODES
    assert tuple(opts["--init"].choices) == INIT_MODES
    assert tuple(opts["--optimizer"].choices) == OPTIMIZER_NAMES
    assert "``" not in opts["--init"].help  # reST quotes are dropped for the terminal


def test_only_given_flags_reach_the_namespace():
    ns = build_parser().parse_args(["train"])
    assert flags.given_values(ns, train_command.OPTIONS) == {}
    assert flags.given_values(ns, flags.ADAPTER_OPTIONS) == {}
    ns = build_parser().parse_args(["train", "--lr", "0.5", "--experts", "3", "--gate-lr", "none"])
    assert flags.given_values(ns, train_command.OPTIONS) == {"lr": 0.5, "gate_lr": None}
    assert flags.given_values(ns, flags.ADAPTER_OPTIONS) == {"num_experts": 3}


@pytest.mark.parametrize("command", ["train", "check-init"])
def test_expert_scales_accepts_a_bare_switch_and_true_false(command):
    pre = [command] if command == "train" else [command, "model"]
    parse = build_parser().parse_args
    assert parse([*pre, "--expert-scales"]).expert_scales is True
    assert parse([*pre, "--expert-scales", "true"]).expert_scales is True
    assert parse([*pre, "--expert-scales", "false", "--rank", "2"]).expert_scales is False
    assert parse([*pre, "--use-rslora", "--router-init-std", "0.1"]).use_rslora is True
    with pytest.raises(SystemExit):
        parse([*pre, "--expert-scales", "maybe"])


def test_choices_are_checked_and_the_optimizer_ignores_case(capsys):
    assert build_parser().parse_args(["train", "--optimizer", "RAdamW"]).optimizer == "RAdamW"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--routing", "nope"])
    assert exc.value.code == 2
    assert "riemix train: error: argument --routing: invalid choice: 'nope'" in capsys.readouterr().err


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


def test_eval_passes_the_flags_to_evaluate_model(monkeypatch, tmp_path, capsys):
    calls = []

    def fake(**kw):
        calls.append(kw)
        return {"dataset": "d", "split": "dev", "examples": 3, "accuracy": 2 / 3}

    monkeypatch.setattr(eval_command, "evaluate_model", fake)
    out = tmp_path / "m.json"
    argv = ["eval", "--model", "m", "--dataset", "d", "--label-words", "no", "yes", "--subset", "3",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert calls == [{"model": "m", "dataset": "d", "label_words": ["no", "yes"], "subset": 3}]
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) == fake()


def test_check_init_rejects_bad_arguments_before_loading_a_model(tmp_path):
    with pytest.raises(ValueError, match=r"--threshold must be >= 0, got -1"):
        check_init("no-such-model", threshold=-1)
    with pytest.raises(ValueError, match=r"--trained needs a run directory with config.yaml"):
        check_init(str(tmp_path), trained=True)
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        check_init("no-such-model", dtype="int8")


# ---------------------------------------------------------------- errors and help
@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--lr", "-1", "--model", "x"], "lr must be >= 0, got -1.0"),
        (["train", "--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
        (["train", "--dataset", "/nonexistent/train.jsonl"], "/nonexistent/train.jsonl"),
        (
            ["train", "--model", "nobody/nothing", "--dataset", "glue/sst2", "--train-subset", "8"],
            "could not load",
        ),
        (["eval", "--dataset", "no_such_dataset"], "no_such_dataset"),
    ],
)
def test_cli_errors_exit_2_with_message(argv, match, capsys, tmp_path):
    argv = argv + (["--output-dir", str(tmp_path / "o")] if argv[0] == "train" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "error" in err


def test_cli_bad_yaml_and_unknown_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    bad.write_text("learning_rate: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["inspect", "--help"], ["check-init", "--help"]]
)
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: riemix" in capsys.readouterr().out


# ---------------------------------------------------------------- python -m riemix
def test_python_dash_m_riemix(tmp_path):
    run = [sys.executable, "-m", "riemix"]
    ok = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "usage: riemix" in ok.stdout and "check-init" in ok.stdout
    bad = subprocess.run([*run, "inspect", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert f"riemix inspect: error: {tmp_path / 'nope'}: run directory not found" in bad.stderr
