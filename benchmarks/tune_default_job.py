"""Choose the default job's learning rate on a held-out part of SST-2 *train* (never on dev).

Runs the default job's setup (SmolLM2-135M, MoE-LoRA, gate-rescaled RAdamW, 120 steps of batch 16) for a
few learning rates, training on 90% of the packaged SST-2 train subset and scoring the other 10%.
Prints a table and writes ``benchmarks/results/tune_default_job.json``.

    python benchmarks/tune_default_job.py --lrs 3e-4 1e-3 3e-3
"""

from __future__ import annotations

import json

from lib.harness import RESULTS, script_parser, write_json
from lib.runner import batch_source, train_loop

from riemix import add_moe_lora, build_optimizer
from riemix.data import load_dataset
from riemix.evaluate import evaluate
from riemix.hub import load_model
from riemix.tasks import TaskModel, TaskSpec
from riemix.training import TrainConfig, encode_items, seed_everything


def run(lr: float, cfg: TrainConfig, train_ds, held_ds) -> dict:
    seed_everything(cfg.seed)
    model, tok = load_model(cfg.model)
    spec = TaskSpec.for_dataset(train_ds, "causal_lm")
    add_moe_lora(model, cfg.adapter)
    tm = TaskModel(model, "causal_lm")
    items = encode_items([train_ds], [spec], tok, "causal_lm")
    opt = build_optimizer(model, cfg.optimizer, lr=lr, gate_lr=cfg.gate_lr, gate_max_grad_norm=cfg.gate_max_grad_norm)
    batches = batch_source(items, tok, "causal_lm", cfg.max_length, cfg.batch_size, cfg.seed)
    loop = train_loop(tm, opt, batches, cfg.max_steps)
    acc = evaluate(tm, held_ds, spec, tok, 32)["accuracy"]
    return {"lr": lr, "heldout_accuracy": acc, "train_seconds": loop.train_seconds, "final_loss": loop.losses[-1]}


def main() -> None:
    parser = script_parser(__doc__)
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
    record = {
        "adapter": cfg.to_dict()["adapter"],
        "optimizer": cfg.optimizer,
        "steps": args.steps,
        "batch_size": cfg.batch_size,
        "runs": rows,
    }
    write_json(RESULTS / "tune_default_job.json", record)


if __name__ == "__main__":
    main()
