"""The ``quantization`` and ``base_dtype`` options: TrainConfig validation and their command-line flags."""

from __future__ import annotations

import pytest

from riemix.cli import build_parser
from riemix.hub.quantize import BASE_DTYPES, QUANTIZATIONS
from riemix.training.config import TrainConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantization": "q4"}, r"quantization must be 'nf4', 'fp4', 'int8' or null, got 'q4'"),
        ({"quantization": 4}, r"quantization must be a string or null, got 4"),
        ({"base_dtype": "fp16"}, r"base_dtype must be 'fp32', 'bf16' or null, got 'fp16'"),
    ],
)
def test_bad_values_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(kwargs)


def test_valid_values_round_trip_through_yaml(tmp_path):
    cfg = TrainConfig(quantization="nf4", base_dtype="bf16")
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    again = TrainConfig.from_yaml(path)
    assert (again.quantization, again.base_dtype) == ("nf4", "bf16")
    assert (TrainConfig().quantization, TrainConfig().base_dtype) == (None, None)


def test_flags_take_the_valid_values_and_none():
    parse = build_parser().parse_args
    ns = parse(["train", "--quantization", "int8", "--base-dtype", "bf16"])
    assert (ns.quantization, ns.base_dtype) == ("int8", "bf16")
    ns = parse(["train", "--quantization", "none", "--base-dtype", "null"])  # overrides a YAML value
    assert (ns.quantization, ns.base_dtype) == (None, None)
    for flag, bad in (("--quantization", "q4"), ("--base-dtype", "fp16")):
        with pytest.raises(SystemExit):
            parse(["train", flag, bad])


def test_flag_choices_come_from_the_constants_load_model_checks(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "--quantization {" + ",".join(QUANTIZATIONS) + "}" in text
    assert "--base-dtype {" + ",".join(BASE_DTYPES) + "}" in text
