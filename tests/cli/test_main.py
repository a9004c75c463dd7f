"""``riemix``: the entry point, its errors (exit 2 with a message), help of every subcommand, ``python -m riemix``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from riemix.cli import main


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--lr", "-1", "--model", "x"], "lr must be >= 0 and finite, got -1.0"),
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


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["inspect", "--help"], ["check-init", "--help"]]
)
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: riemix" in capsys.readouterr().out


def test_python_dash_m_riemix(tmp_path):
    run = [sys.executable, "-m", "riemix"]
    ok = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "usage: riemix" in ok.stdout and "check-init" in ok.stdout
    bad = subprocess.run([*run, "inspect", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert f"riemix inspect: error: {tmp_path / 'nope'}: run directory not found" in bad.stderr


def test_a_typo_gets_the_subcommands_usage_and_a_did_you_mean(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--adaptor", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: riemix eval ")  # the subcommand's usage, not the top-level one
    assert "riemix eval: error: unrecognized arguments: --adaptor x (--adaptor: did you mean --adapter?)" in err
    with pytest.raises(SystemExit):
        main(["train", "--zzz-unknown", "1"])
    assert "riemix train: error: unrecognized arguments: --zzz-unknown 1\n" in capsys.readouterr().err
