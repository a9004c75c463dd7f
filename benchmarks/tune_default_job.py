"""Choose the default job's learning rate on a held-out part of SST-2 *train* (never on dev).

Runs the default job's setup (SmolLM2-135M, MoE-LoRA, gate-rescaled RAdamW, 120 steps of batch 16) for a
few learning rates, training on 90% of the packaged SST-2 train subset and scoring the other 10%.
Prints a table and writes ``benchmarks/results/tune_default_job.json``.

    python benchmarks/tune_default_job.py --lrs 3e-4 1e-3 3e-3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import train_loop

from riemix.core.config import MoELoRAConfig
from riemix.core.tuner import add_moe_lora
from riemix.data import load_dataset
from riemix.evaluate import evaluate
from riemix.hub.loading import load_model
from riemix.io.fileio import atomic_write_text
from riemix.optim import build_optimizer
from riemix.tasks import TaskModel, TaskSpec, collate_lm, encode_train
from riemix.training.recipe import TrainConfig, _batch_at, _seed_everything


def run(lr: float, cfg: TrainConfig, train_ds, held_ds) -> dict:
    _seed_everything(cfg.seed)
    model, tok = load_model(cfg.model)
    spec = TaskSpec.for_dataset(train_ds, "causal_lm")
    add_moe_lora(model, MoELoRAConfig(**cfg.adapter))
    tm = TaskModel(model, "causal_lm")
    items = [encode_train(ex, spec, tok) for ex in train_ds.examples]
    opt = build_optimizer(model, cfg.optimizer, lr=lr, gate_lr=cfg.gate_lr, gate_max_grad_norm=cfg.gate_max_grad_norm)
    loop = train_loop(
        tm, opt, lambda step: collate_lm(_batch_at(items, step, cfg, 0, 1), tok.pad_token_id), cfg.max_steps
    )
    acc = evaluate(tm, held_ds, spec, tok, 32)["accuracy"]
    return {"lr": lr, "heldout_accuracy": acc, "train_seconds": loop.train_seconds, "final_loss": loop.losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    cfg = TrainConfig(max_steps=args.steps)
    full = load_dataset("glue/sst2", "train")
    train_ds, held_ds = full.split(0.9, seed=0)
    held_ds = held_ds.subset(400, seed=0)
    rows = []
    for lr in args.lrs:
        rows.append(run(lr, cfg, train_ds, held_ds))
        print(json.dumps(rows[-1]), flush=True)
    print(f"{'lr':>8} {'held-out acc':>13} {'train s':>8}")
    for r in rows:
        print(f"{r['lr']:8.0e} {r['heldout_accuracy']:13.4f} {r['train_seconds']:8.0f}")
    out = Path(__file__).parent / "results" / "tune_default_job.json"
    atomic_write_text(
        out,
        json.dumps(
            {
                "adapter": cfg.adapter,
                "optimizer": cfg.optimizer,
                "steps": args.steps,
                "batch_size": cfg.batch_size,
                "runs": rows,
            },
            indent=2,
        )
        + "\n",
    )


if __name__ == "__main__":
    main()
