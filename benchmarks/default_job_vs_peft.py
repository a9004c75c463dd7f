"""The default job (``riemix train`` with no arguments) against a PEFT LoRA baseline, same data and budget.

1. ``riemix``: exactly the default job — SmolLM2-135M-Instruct, MoE-LoRA (TrainConfig defaults),
   gate-rescaled Riemannian AdamW, 120 steps of batch 16 on the packaged SST-2 train subset, zero-shot and
   final accuracy on the full SST-2 dev split (872), wall time of the whole job (model load included).
2. ``peft_lora_r16``: PEFT LoRA r=16, alpha 32 on q/k/v/o + torch AdamW lr 2e-4 (the reference figure quoted
   in the issue), linear decay, the same batches in the same order, the same prompt, label words and
   evaluation code.

Prints a table and writes ``benchmarks/results/default_job_vs_peft.json``.

    python benchmarks/default_job_vs_peft.py            # both (about 12 minutes on 2 cores)
    python benchmarks/default_job_vs_peft.py --only riemix
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
from lib.harness import RESULTS, record_header, script_parser, write_record
from lib.runner import batch_source, train_loop

from riemix.training import TrainConfig, encode_items, seed_everything, train


def run_riemix(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        summary = train(TrainConfig(output_dir=tmp, max_steps=steps, progress=False))
        wall = time.time() - t0
    return {
        "zero_shot_accuracy": summary["before"]["accuracy"],
        "accuracy": summary["after"]["accuracy"],
        "wall_seconds": wall,
        "train_seconds": summary["train_seconds"],
        "tokens_per_s": summary["tokens_per_s"],
    }


def run_peft(steps: int, lr: float) -> dict:
    from peft import LoraConfig, get_peft_model

    from riemix.data import load_dataset
    from riemix.evaluate import evaluate
    from riemix.hub import load_model
    from riemix.tasks import TaskModel, TaskSpec

    cfg = TrainConfig(max_steps=steps)
    t0 = time.time()
    seed_everything(cfg.seed)
    model, tok = load_model(cfg.model)
    train_ds, dev = load_dataset(cfg.dataset, "train"), load_dataset(cfg.dataset, "dev")
    spec = TaskSpec.for_dataset(train_ds, "causal_lm")
    peft_model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    model = peft_model.base_model.model
    task_model = TaskModel(model, "causal_lm")
    items = encode_items([train_ds], [spec], tok, "causal_lm")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    batches = batch_source(items, tok, "causal_lm", cfg.max_length, cfg.batch_size, cfg.seed)
    loop = train_loop(task_model, opt, batches, steps)
    acc = evaluate(task_model, dev, spec, tok, cfg.eval_batch_size)["accuracy"]
    return {
        "accuracy": acc,
        "wall_seconds_without_zero_shot": time.time() - t0,
        "train_seconds": loop.train_seconds,
        "lr": lr,
    }


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--peft-lr", type=float, default=2e-4)
    parser.add_argument("--only", choices=["riemix", "peft"])
    args = parser.parse_args()
    rows = {}
    if args.only in (None, "riemix"):
        rows["riemix_default_job"] = run_riemix(args.steps)
        print(json.dumps(rows["riemix_default_job"]), flush=True)
    if args.only in (None, "peft"):
        rows["peft_lora_r16_adamw"] = run_peft(args.steps, args.peft_lr)
        print(json.dumps(rows["peft_lora_r16_adamw"]), flush=True)
    print(f"\nSST-2 dev (872), SmolLM2-135M-Instruct, {args.steps} steps x batch 16, {torch.get_num_threads()} threads")
    print(f"{'candidate':<22} {'accuracy':>9} {'train s':>8}")
    for name, r in rows.items():
        print(f"{name:<22} {r['accuracy']:9.4f} {r['train_seconds']:8.0f}")
    if "riemix_default_job" in rows:
        r = rows["riemix_default_job"]
        print(f"zero-shot {r['zero_shot_accuracy']:.4f}; riemix default job wall time {r['wall_seconds']:.0f} s")
    out = RESULTS / "default_job_vs_peft.json"
    previous = json.loads(out.read_text()) if out.exists() and args.only else {}
    record = {
        **record_header("default_job_vs_peft"),
        "steps": args.steps,
        "results": {**previous.get("results", {}), **rows},
    }
    write_record(record, "default_job_vs_peft", out=out)


if __name__ == "__main__":
    main()
