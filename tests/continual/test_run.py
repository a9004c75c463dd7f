"""The continual recipe end to end on a tiny Llama: growth, freezing, replay, the run directory and resume."""

import json

import pytest
import torch

import riemix.continual.run as run_module
from riemix.continual.config import ContinualConfig
from riemix.continual.metrics import cl_metrics
from riemix.continual.run import run_continual
from riemix.core.state import adapter_state_dict
from riemix.core.tuner import iter_moe_lora_layers
from riemix.io.adapter import load_adapter
from tests.continual.test_stream import make_task
from tests.helpers import make_tiny_llama, tiny_tokenizer


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    make_task(root, "fruit", ["apple", "pear"], n_train=24)
    make_task(root, "stone", ["rock", "sand", "clay"], n_train=24)
    make_task(root, "taste", ["good", "bad"], n_train=24)
    return root


def cfg_for(data, out, **kw):
    base = dict(
        stream=["fruit", "stone", "taste"],
        data_dir=str(data),
        output_dir=str(out),
        max_length=32,
        steps_per_task=4,
        batch_size=4,
        eval_batch_size=8,
        novelty_samples=8,
        grow="always",
        replay_per_task=4,
        progress=False,
        lr=1e-2,
        novelty_threshold=-1.0,
    )
    base["adapter"] = {
        "num_experts": 1,
        "top_k": 1,
        "rank": 2,
        "mature_after_steps": 2,
        "target_modules": ["q_proj", "v_proj"],
    }
    return ContinualConfig(**{**base, **kw})


def run(cfg, lines=None):
    return run_continual(
        cfg,
        model=make_tiny_llama(),
        tokenizer=tiny_tokenizer(),
        log=(lines.append if lines is not None else lambda msg: None),
    )


def test_a_stream_grows_one_expert_per_new_skill_and_writes_its_results(data, tmp_path):
    lines = []
    res = run(cfg_for(data, tmp_path / "run"), lines)
    out = tmp_path / "run"
    assert [len(row) for row in res["matrix"]] == [3, 3, 3]
    assert res["matrix"][0][2] is None and all(v is not None for v in res["matrix"][1])  # seen + next only
    assert {k: res[k] for k in ("avg", "avg_incremental", "bwt", "fwt")} == pytest.approx(
        cl_metrics(res["matrix"], res["zero_shot"])
    )
    assert [max(h["experts"].values()) for h in res["experts"]] == [1, 2, 3]
    assert res["experts"][-1]["frozen"]["model.layers.0.self_attn.q_proj"] == [0, 1]  # the other skills'
    assert res["skills"] == {"fruit": 0, "stone": 1, "taste": 2}
    assert [d["reason"] for d in res["decisions"]] == ["first", "always", "always"]
    assert all(len(u["model.layers.0.self_attn.q_proj"]) == 3 for u in res["usage"].values())
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    assert (out / "plots" / "accuracy_matrix.png").is_file() and (out / "plots" / "skill_experts.png").is_file()
    model = load_adapter(make_tiny_llama(), out / "adapter")  # the grown adapter loads onto a fresh base
    assert sum(t.numel() for t in adapter_state_dict(model).values()) == res["trainable_params"]
    assert any("grew one expert in 4 layers" in line for line in lines)


def test_grow_never_keeps_one_skill_and_trains_every_expert(data, tmp_path):
    res = run(
        cfg_for(
            data,
            tmp_path / "run",
            grow="never",
            freeze="never",
            adapter={"num_experts": 2, "top_k": 1, "rank": 2, "target_modules": ["q_proj"]},
        )
    )
    assert [max(h["experts"].values()) for h in res["experts"]] == [2, 2, 2]
    assert set(res["skills"].values()) == {0} and res["frozen_skills"] == []


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", [2, 6])  # within task 1 (after its checkpoint at step 2), within task 2
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(data, tmp_path, monkeypatch, crash_at):
    straight = run(cfg_for(data, tmp_path / "a", save_every=2))
    original = run_module._train_step
    calls = {"n": 0}

    def crashing(run_state, k):
        if calls["n"] == crash_at + 1:
            raise Crash
        calls["n"] += 1
        return original(run_state, k)

    monkeypatch.setattr(run_module, "_train_step", crashing)
    with pytest.raises(Crash):
        run(cfg_for(data, tmp_path / "b", save_every=2))
    monkeypatch.setattr(run_module, "_train_step", original)
    resumed = run(cfg_for(data, tmp_path / "b", save_every=2, resume=True))
    assert resumed["matrix"] == straight["matrix"]
    a = adapter_state_dict(load_adapter(make_tiny_llama(), tmp_path / "a" / "adapter"))
    b = adapter_state_dict(load_adapter(make_tiny_llama(), tmp_path / "b" / "adapter"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_directory_is_never_reused_by_accident(data, tmp_path):
    run(cfg_for(data, tmp_path / "run", stream=["fruit"]))
    with pytest.raises(ValueError, match="already holds a continual run: pass resume to continue it or overwrite"):
        run(cfg_for(data, tmp_path / "run", stream=["fruit"]))
    with pytest.raises(
        ValueError, match=r"different stream or configuration: stream: saved \['fruit'\], now \['stone'\]"
    ):
        run(cfg_for(data, tmp_path / "run", stream=["stone"], resume=True))
    with pytest.raises(ValueError, match=r"different stream or configuration: lr: 0.01 -> 0.02"):
        run(cfg_for(data, tmp_path / "run", stream=["fruit"], resume=True, lr=2e-2))
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not a continual run's: \['notes.txt'\]"):
        run(cfg_for(data, tmp_path / "run", stream=["fruit"], overwrite=True))
    (tmp_path / "run" / "notes.txt").unlink()
    res = run(cfg_for(data, tmp_path / "run", stream=["fruit"], overwrite=True))
    assert res["tasks_done"] == 1


def test_a_changed_task_file_refuses_the_resume(data, tmp_path):
    run(cfg_for(data, tmp_path / "run", stream=["fruit"]))
    with open(data / "fruit" / "train.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "fig", "label": "apple"}) + "\n")
    with pytest.raises(ValueError, match=r"task 'fruit': its classes or files changed since the run started"):
        run(cfg_for(data, tmp_path / "run", stream=["fruit"], resume=True))


def test_other_files_and_a_missing_run_are_refused(data, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"is not empty and holds no continual run \(\['x.txt'\]\)"):
        run(cfg_for(data, tmp_path / "busy"))
    with pytest.raises(ValueError, match="cannot resume: output_dir .* holds no continual run"):
        run(cfg_for(data, tmp_path / "empty", resume=True))


def test_grow_auto_reuses_a_known_skill_and_its_experts(data, tmp_path):
    res = run(cfg_for(data, tmp_path / "run", grow="auto"))  # novelty_threshold -1: every later task is known
    assert [d["reason"] for d in res["decisions"]] == ["first", "known", "known"]
    assert set(res["skills"].values()) == {0} and [max(h["experts"].values()) for h in res["experts"]] == [1, 1, 1]
    assert res["experts"][-1]["frozen"]["model.layers.0.self_attn.q_proj"] == []  # its own experts train


def test_auto_freeze_evaluates_the_current_task_and_freezes_a_skill_that_stops_improving(data, tmp_path):
    res = run(cfg_for(data, tmp_path / "run", freeze="auto", eval_every=1, freeze_patience=1, lr=0.0))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("event") == "eval"]
    assert len(evals) == 3 * 4 and {e["task"] for e in evals} == {"fruit", "stone", "taste"}
    assert res["frozen_skills"] == ["fruit", "stone", "taste"]  # lr 0: nothing improves after the first evaluation


def test_skill_routing_sends_each_example_to_its_skill_experts_only(data, tmp_path):
    adapter = {"num_experts": 1, "top_k": 1, "rank": 2, "target_modules": ["q_proj", "v_proj"]}
    res = run(cfg_for(data, tmp_path / "run", skill_routing=True, adapter=adapter))
    assert [max(h["experts"].values()) for h in res["experts"]] == [1, 2, 3]
    assert all(v is not None for v in res["matrix"][-1])
    model = load_adapter(make_tiny_llama(), tmp_path / "run" / "adapter")
    assert all(layer.selection_bias is None for _, layer in iter_moe_lora_layers(model))


def test_a_first_task_with_too_few_texts_to_judge_still_starts_the_skill_library(tmp_path):
    root = tmp_path / "data"
    make_task(root, "tiny", ["apple", "pear"], n_train=4)
    make_task(root, "more", ["rock", "sand"], n_train=4)
    res = run(cfg_for(root, tmp_path / "run", stream=["tiny", "more"], batch_size=2, steps_per_task=2, grow="auto"))
    assert [d["reason"] for d in res["decisions"]] == ["too_few_samples", "too_few_samples"]
    assert res["skills"] == {"tiny": 0, "more": 0}


def test_a_damaged_checkpoint_is_named_instead_of_a_traceback(data, tmp_path):
    run(cfg_for(data, tmp_path / "run", stream=["fruit"]))
    (tmp_path / "run" / "checkpoint" / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        ValueError, match=r"cannot resume from .*checkpoint: .* \(use overwrite to start the run again\)"
    ):
        run(cfg_for(data, tmp_path / "run", stream=["fruit"], resume=True))


def test_the_auto_freeze_holdout_is_a_disjoint_fifth_of_the_training_split(data):
    (task,) = run_module.load_stream(["fruit"], data_dir=data)
    held, rest = run_module._split_holdout(task.train, seed=3)
    held_ids, rest_ids = {id(ex) for ex in held.examples}, {id(ex) for ex in rest.examples}
    assert len(held_ids) == 4 and len(rest_ids) == 20 and held_ids.isdisjoint(rest_ids)
    assert held_ids | rest_ids == {id(ex) for ex in task.train.examples}
