"""``riemix continual`` and ``riemix inspect`` of a continual run, on a tiny model directory."""

import json

from riemix.cli import main
from tests.continual.test_stream import make_task
from tests.helpers import save_tiny_model_dir


def common(tmp_path, data):
    return [
        "--data-dir",
        str(data),
        "--model",
        save_tiny_model_dir(tmp_path),
        "--max-length",
        "32",
        "--steps-per-task",
        "2",
        "--batch-size",
        "4",
        "--eval-batch-size",
        "8",
        "--novelty-samples",
        "8",
        "--no-progress",
        "--target-modules",
        "q_proj",
        "--rank",
        "2",
        "--mature-after-steps",
        "1",
    ]


def test_a_stream_trains_from_the_command_line_and_inspect_shows_per_skill_usage(tmp_path, capsys):
    data = tmp_path / "data"
    make_task(data, "fruit", ["apple", "pear"])
    make_task(data, "stone", ["rock", "sand", "clay"])
    out = tmp_path / "run"
    args = [
        "continual",
        "--stream",
        "fruit,stone",
        "--grow",
        "always",
        "--output-dir",
        str(out),
        *common(tmp_path, data),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "accuracy R[k][i]" in printed and "Avg " in printed and "per-skill expert usage" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["stream"] == ["fruit", "stone"] and results["tasks_done"] == 2
    assert [max(h["experts"].values()) for h in results["experts"]] == [1, 2]
    assert main(["inspect", str(out), "--no-plots"]) == 0
    shown = capsys.readouterr().out
    assert "per-skill expert usage" in shown and "novelty detector" in shown
    assert main([*args[: -len(common(tmp_path, data))], *common(tmp_path, data)]) == 2  # the run exists
    assert "already holds a continual run" in capsys.readouterr().err


def test_a_stream_entry_that_does_not_exist_exits_2_naming_it(tmp_path, capsys):
    data = tmp_path / "data"
    make_task(data, "fruit", ["apple", "pear"])
    assert (
        main(["continual", "--stream", "fruit,nope", "--data-dir", str(data), "--output-dir", str(tmp_path / "run")])
        == 2
    )
    err = capsys.readouterr().err
    assert "stream entry 'nope' (task 2) does not exist" in err and "tasks there: fruit" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_resume_without_config_restores_the_saved_one_and_refuses_another_stream(tmp_path, capsys):
    data = tmp_path / "data"
    make_task(data, "fruit", ["apple", "pear"])
    make_task(data, "stone", ["rock", "sand", "clay"])
    out = tmp_path / "run"
    assert main(["continual", "--stream", "fruit", "--output-dir", str(out), *common(tmp_path, data)]) == 0
    capsys.readouterr()
    assert main(["continual", "--stream", "stone", "--output-dir", str(out), "--resume"]) == 2
    assert "cannot resume the run in" in capsys.readouterr().err
    assert main(["continual", "--output-dir", str(out), "--resume", "--no-progress"]) == 0
    assert "Avg " in capsys.readouterr().out


def test_a_yaml_config_reads_numbers_as_train_does(tmp_path, capsys):
    from riemix.cli import build_parser
    from riemix.cli.continual import build_config

    path = tmp_path / "cl.yaml"
    path.write_text("stream: a,b\nlr: 1e-3\nadapter:\n  alpha: 8e0\n")
    cfg = build_config(build_parser().parse_args(["continual", "--config", str(path)]))
    assert cfg.lr == 1e-3 and cfg.adapter.alpha == 8.0 and cfg.stream == ["a", "b"]
    assert main(["continual", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
