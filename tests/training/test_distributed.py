"""Data parallel on CPU (gloo, 2 processes via torchrun): the same result as one process on the same global batch."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import read_metrics, save_tiny_model_dir, write_mcq

ROOT = Path(__file__).resolve().parents[2]
WORDS = "alpha beta gamma delta eps zeta eta theta iota kappa".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(argv: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    if processes == 1:
        cmd = [sys.executable, "-m", "riemix", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master-port={_free_port()}", "--tee=3", "-m", "riemix", *argv]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _failure(run: subprocess.CompletedProcess) -> str:
    """What a failed run said: every process's own error lines (``--tee`` prefixes them with its rank)."""
    own = [line for line in run.stderr.splitlines() if line.startswith("[")]
    return "\n".join(own[-60:]) or run.stderr[-3000:]


def _sft_files(folder: Path) -> tuple[Path, Path]:
    """Prompt/completion data whose completions vary from 1 to 9 words: a mean per process would be wrong."""
    rng = random.Random(0)
    paths = []
    for split, n in (("train", 32), ("dev", 10)):
        rows = []
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            completion = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
            rows.append(json.dumps({"prompt": prompt, "completion": completion}))
        paths.append(folder / f"sft_{split}.jsonl")
        paths[-1].write_text("\n".join(rows) + "\n")
    return paths[0], paths[1]


def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path)
    train, dev = _sft_files(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {model_dir}\ndataset: {train}\neval_dataset: {dev}\nmax_steps: 3\ngrad_accum: 2\nlr: 0.01\n"
        "log_every: 1\nprogress: false\n"
        "adapter: {num_experts: 2, top_k: 1, rank: 2, target_modules: [v_proj, o_proj, down_proj]}\n"
    )
    one = _run(["train", "--config", str(cfg), "--batch-size", "4", "--output-dir", "one"], 1, tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(["train", "--config", str(cfg), "--batch-size", "2", "--output-dir", "two"], 2, tmp_path)
    assert two.returncode == 0, _failure(two)
    assert "global batch: 2 per process × 2 process(es) × 2 accumulation = 8 examples per step" in two.stdout
    # The default optimizer (Riemannian AdamW) on the adapters: equal up to the order of float sums. (q/k
    # projections are left out: at B = 0 their gradients are rounding noise, which Adam scales up.)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5 * a[key].abs().max(), key
    lines_one, lines_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(lines_two) == len(lines_one) == 5  # written once (rank 0), not once per process
    for x, y in zip(lines_one, lines_two, strict=True):
        assert x["step"] == y["step"]
        if "loss" in x:  # the global token mean of the step's loss
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
        if "eval" in x:  # evaluation sharded, gathered: the whole dev set's token-mean loss
            assert y["eval"]["loss"] == pytest.approx(x["eval"]["loss"], rel=1e-6)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    # FSDP2: the base sharded, the adapters whole on each process: the same adapters again
    fsdp = _run(["train", "--config", str(cfg), "--batch-size", "2", "--output-dir", "fsdp", "--fsdp"], 2, tmp_path)
    assert fsdp.returncode == 0, _failure(fsdp)
    c = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    for key in a:
        assert (a[key] - c[key]).abs().max() <= 1e-5 * a[key].abs().max(), key
    _loads_unsharded(tmp_path / "fsdp", model_dir)
    # a resume must keep the world size: the data order and the per-process shards depend on it
    again = _run(["train", "--output-dir", "two", "--resume", "--max-steps", "4"], 1, tmp_path)
    assert again.returncode == 2
    assert "written by a run of 2 process(es), this one has 1; resume with 2" in again.stderr


def _loads_unsharded(run: Path, model_dir: str) -> None:
    """A run trained sharded: its adapter and newest checkpoint load into one process's plain model."""
    from riemix import build_optimizer, load_adapter
    from riemix.hub import load_model
    from riemix.io.checkpoint import latest_checkpoint, load_checkpoint

    model, _ = load_model(model_dir)
    load_adapter(model, run / "adapter")  # the base-weight digests were taken before sharding: they match
    optimizer = build_optimizer(model, "radamw", lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert load_checkpoint(latest_checkpoint(run), model, optimizer, scheduler)["step"] == 3


def test_fsdp_needs_several_processes_and_a_full_precision_base(tmp_path):
    from riemix.training.config import TrainConfig

    model_dir = save_tiny_model_dir(tmp_path)
    train, _ = _sft_files(tmp_path)
    one = _run(["train", "--model", model_dir, "--dataset", str(train), "--fsdp", "--max-steps", "1",
                "--output-dir", "x", "--no-progress"], 1, tmp_path)  # fmt: skip
    assert one.returncode == 2
    assert "fsdp needs several processes: launch with torchrun --nproc_per_node N" in one.stderr
    with pytest.raises(ValueError, match=r"fsdp and quantization='nf4' exclude each other"):
        TrainConfig(fsdp=True, quantization="nf4")


EVAL_SCRIPT = """
import json, sys, torch
import torch.distributed as dist
from riemix.data import load_dataset
from riemix.evaluate import evaluate
from riemix.tasks import TaskModel, TaskSpec
from tests.helpers import make_tiny_llama, tiny_tokenizer
dist.init_process_group("gloo")
ds = load_dataset(sys.argv[1], "dev")
spec = TaskSpec.for_dataset(ds, "causal_lm")
got = evaluate(TaskModel(make_tiny_llama(), "causal_lm"), ds, spec, tiny_tokenizer(), 4,
               shard=(dist.get_rank(), dist.get_world_size()))
if dist.get_rank() == 0:
    print(json.dumps(got))
dist.destroy_process_group()
"""


def test_sharded_evaluation_gathers_predictions_in_dataset_order(tmp_path):
    from riemix.data import load_dataset
    from riemix.evaluate import evaluate, predict
    from riemix.tasks import TaskModel, TaskSpec
    from tests.helpers import make_tiny_llama, tiny_tokenizer

    data = write_mcq(tmp_path / "dev.jsonl", 23, 3)  # 23 examples: shards of 12 and 11
    script = tmp_path / "eval.py"
    script.write_text(EVAL_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={_free_port()}",
           str(script), str(data)]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    sharded = json.loads(run.stdout.strip().splitlines()[-1])
    ds = load_dataset(str(data), "dev")
    tm, spec = TaskModel(make_tiny_llama(), "causal_lm"), TaskSpec.for_dataset(ds, "causal_lm")
    torch.manual_seed(0)
    assert sharded == evaluate(tm, ds, spec, tiny_tokenizer(), 4)
    preds = predict(tm, ds, spec, tiny_tokenizer(), 4)["preds"]
    assert 0 < sharded["accuracy"] < 1 and len(preds) == 23  # a non-trivial score: the order matters


def test_transformer_blocks_are_the_longest_list_of_same_typed_modules():
    from torch import nn

    from riemix.training.sharding import transformer_blocks
    from tests.helpers import make_tiny_llama

    model = make_tiny_llama()
    assert transformer_blocks(model) == list(model.model.layers)
    with pytest.raises(ValueError, match=r"fsdp: found no list of transformer blocks in Sequential to shard"):
        transformer_blocks(nn.Sequential(nn.Linear(2, 2)))
