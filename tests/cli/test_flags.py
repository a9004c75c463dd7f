"""Generated command-line flags: parsed from the config docstrings, one per field, with help, defaults, choices."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

import riemix.cli.train as train_command
from riemix.cli import build_parser, flags, main
from riemix.core.config import INIT_MODES, ROUTING_MODES, MoELoRAConfig
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


def test_every_option_of_every_subcommand_has_a_help_line_and_its_own_dest():
    subs = subparsers()
    assert set(subs) == {"train", "continual", "eval", "inspect", "check-init", "data", "export", "generate"}
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
    rank_doc = flags.docstring_entries(MoELoRAConfig.__doc__, "Attributes")["rank"].replace("``", "")
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


def test_per_layer_expert_lists_and_regex_targets_from_the_command_line():
    from riemix.cli.flags import ADAPTER_OPTIONS, given_values

    def adapter(*argv):
        return given_values(build_parser().parse_args(["train", *argv]), ADAPTER_OPTIONS)

    assert adapter("--experts", "4") == {"num_experts": 4}
    assert adapter("--experts", "2", "4", "8") == {"num_experts": [2, 4, 8]}
    assert adapter("--rank", "2", "4", "8") == {"rank": [2, 4, 8]}  # a rank per layer
    assert MoELoRAConfig(**adapter("--rank", "2", "4", "8")).rank_for_layer(1) == 4
    assert MoELoRAConfig(**adapter("--experts", "2", "4", "8", "--top-k", "2")).experts_for_layer(2) == 8
    assert adapter("--target-modules", "q_proj", r"re:.*\.v_proj") == {"target_modules": ["q_proj", r"re:.*\.v_proj"]}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--experts", "2", "x"])
