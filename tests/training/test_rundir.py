"""riemix.training.rundir: output-directory checks, the lock, reuse refused, resume config comparison, metrics."""

from __future__ import annotations

import json
import os
import socket

import pytest

from riemix.training import rundir
from riemix.training.config import TrainConfig
from riemix.training.rundir import (
    LOCK_NAME,
    RUN_FILE,
    check_output_dir,
    config_differences,
    open_run,
    truncate_metrics,
)
from tests.helpers import read_metrics, tiny_train_cfg, train_tiny, write_mcq


def _cfg(out, **kw):
    return TrainConfig(output_dir=str(out), progress=False, verbose=False, **kw)


def test_check_output_dir_refuses_files_special_folders_and_unwritable_places(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"output_dir .*/f is a file, not a directory"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(ValueError, match=r"output_dir .*/f/run is under .*/f, which is a file"):
        check_output_dir(tmp_path / "f" / "run")
    for special in ("/proc/riemix-run", "/sys/x", "/dev/shm-run"):
        with pytest.raises(ValueError, match=r"is under /(proc|sys|dev), which holds no files a run can write"):
            check_output_dir(special)

    def denied(**kw):
        raise PermissionError(13, "Permission denied")  # what a read-only folder answers to a non-root user

    monkeypatch.setattr(rundir.tempfile, "mkstemp", denied)
    with pytest.raises(ValueError, match=r"output_dir .*/ro cannot be written: Permission denied"):
        check_output_dir(tmp_path / "ro")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"MiB free on its file system; a run needs at least 1048576 MiB"):
        check_output_dir(tmp_path / "ok", min_free=2**40)
    assert check_output_dir(tmp_path / "ok").is_dir()


def test_a_directory_holding_a_run_is_never_silently_reused(tmp_path):
    out = tmp_path / "run"
    with open_run(_cfg(out)) as run:
        assert run.locked and (out / LOCK_NAME).is_file() and not run.resuming
        first_id = run.run_id
        assert json.loads((out / RUN_FILE).read_text())["run_id"] == first_id
        assert json.loads((out / LOCK_NAME).read_text())["run_id"] == first_id
    assert not (out / LOCK_NAME).exists()  # released
    (out / "config.yaml").write_text(_cfg(out).to_yaml())
    with pytest.raises(ValueError, match=r"already holds a run \(config.yaml, run.json\); pass --resume .*--overwrite"):
        open_run(_cfg(out))
    said = []
    with open_run(_cfg(out, overwrite=True), said.append) as run:
        assert run.run_id != first_id and sorted(p.name for p in out.iterdir()) == [LOCK_NAME, RUN_FILE]
    assert said == [f"overwrite: deleting the previous run in {out}"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match=r"already holds files \(thesis.tex\)"):
        open_run(_cfg(tmp_path / "mine"))
    with pytest.raises(ValueError, match=r"overwrite: .*mine is not a riemix run directory .*refusing to delete"):
        open_run(_cfg(tmp_path / "mine", overwrite=True))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"


def test_the_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    record = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": "abc"}
    (out / LOCK_NAME).write_text(json.dumps(record))  # a live process (this one) holds it
    with pytest.raises(ValueError, match=r"is in use by another training \(pid \d+ on host .*run abc\).*delete"):
        open_run(_cfg(out))
    (out / LOCK_NAME).write_text(json.dumps({**record, "host": "elsewhere"}))  # another host: never guessed
    with pytest.raises(ValueError, match=r"on host 'elsewhere'"):
        open_run(_cfg(out))
    (out / LOCK_NAME).write_text(json.dumps({**record, "pid": 2**22 + 12345}))  # no such process
    said = []
    with open_run(_cfg(out), said.append) as run:
        assert run.locked and json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert said[0].startswith("warning: removing the stale lock of process")


def test_config_differences_name_each_unsafe_field():
    saved = TrainConfig(dataset="arc_easy", lr=1e-3, adapter={"rank": 4})
    now = TrainConfig(dataset="glue/sst2", lr=1e-3, max_steps=500, eval_every=10, adapter={"rank": 8})
    assert config_differences(saved, now) == [
        "adapter.rank: 4 in the run, 8 now",
        "dataset: 'arc_easy' in the run, 'glue/sst2' now",
    ]
    assert config_differences(saved, TrainConfig(dataset="arc_easy", adapter={"rank": 4}, max_steps=9)) == []


def test_resume_refuses_a_changed_config_naming_every_difference(tmp_path):
    out = tmp_path / "run"
    with open_run(_cfg(out, dataset="arc_easy")):
        (out / "config.yaml").write_text(_cfg(out, dataset="arc_easy").to_yaml())
    with pytest.raises(ValueError, match=r"resume: the configuration differs .*dataset: 'arc_easy' in the run, "
                       r"'glue/sst2' now; optimizer: 'radamw' in the run, 'sgd' now"):  # fmt: skip
        open_run(_cfg(out, resume=True, optimizer="sgd"))
    assert not (out / LOCK_NAME).exists()  # a refused open leaves no lock behind
    with open_run(_cfg(out, resume=True, dataset="arc_easy", max_steps=300)) as run:
        assert run.resuming and run.run_id == json.loads((out / RUN_FILE).read_text())["run_id"]
    with pytest.raises(ValueError, match=r"resume: .*empty holds no run to continue \(no config.yaml\)"):
        open_run(_cfg(tmp_path / "empty", resume=True))


def test_truncate_metrics_keeps_the_checkpoints_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval": {}}, {"step": 3, "loss": 1.0}, {"step": 4, "loss": 0.9}, {"step": 6, "loss": 0.8}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 7, "lo')
    assert truncate_metrics(path, 4) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 3, 4]
    assert truncate_metrics(path, 4) == 0
    assert truncate_metrics(tmp_path / "missing.jsonl", 1) == 0


def test_the_readme_mistake_resuming_another_task_is_refused_and_changes_nothing(tmp_path):
    """The issue's data-loss case: a run continued on other data overwrote the adapter; now refused."""
    a = write_mcq(tmp_path / "a.jsonl", 16, 0)
    b = write_mcq(tmp_path / "b.jsonl", 16, 1)
    out = tmp_path / "run"
    cfg = tiny_train_cfg(out, a, batch_size=4, max_steps=2, eval_before=False, adapter={"num_experts": 2, "top_k": 1})
    train_tiny(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "adapter").iterdir()}
    lines = read_metrics(out)
    with pytest.raises(ValueError, match=r"dataset: '.*a.jsonl' in the run, '.*b.jsonl' now"):
        train_tiny(tiny_train_cfg(out, b, batch_size=4, max_steps=4, eval_before=False, resume=True,
                                  adapter={"num_experts": 2, "top_k": 1}))  # fmt: skip
    with pytest.raises(ValueError, match=r"already holds a run"):
        train_tiny(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "adapter").iterdir()} == before
    assert read_metrics(out) == lines


def test_resume_from_a_checkpoint_of_another_run_is_refused(tmp_path):
    import shutil

    data = write_mcq(tmp_path / "tr.jsonl", 16, 0)

    def cfg(out, **kw):
        return tiny_train_cfg(out, data, batch_size=4, max_steps=2, save_every=1, eval_before=False,
                              adapter={"num_experts": 2, "top_k": 1}, **kw)  # fmt: skip

    train_tiny(cfg(tmp_path / "a"))
    train_tiny(cfg(tmp_path / "b"))  # same config, another run id
    foreign = tmp_path / "a" / "checkpoints" / "step-000001"
    with pytest.raises(ValueError, match=r"--resume .*step-000001: written by run \w+, not by the run in .*b \(\w+\)"):
        train_tiny(cfg(tmp_path / "b", resume=str(foreign)))
    shutil.copytree(foreign, tmp_path / "b" / "checkpoints" / "step-000009")  # planted among b's own
    said = []
    from riemix.io.checkpoint import find_resumable

    run_id = json.loads((tmp_path / "b" / RUN_FILE).read_text())["run_id"]
    assert find_resumable(tmp_path / "b", run_id, said.append).name == "step-000002"
    assert "step-000009 (written by run" in said[0]


def test_a_lock_that_keeps_reappearing_is_reported(tmp_path, monkeypatch):
    def taken(*args, **kwargs):
        raise FileExistsError(17, "File exists")  # another writer wins every race, then lets go

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(rundir, "check_output_dir", lambda path: path)  # its own probe file uses os.open
    monkeypatch.setattr(rundir.os, "open", taken)
    with pytest.raises(ValueError, match=r"could not lock output_dir .*run: .*\.riemix\.lock kept reappearing"):
        open_run(_cfg(tmp_path / "run"))
