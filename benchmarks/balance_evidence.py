"""Routing collapse and its cure, side by side, on a real model and dataset.

SmolLM2-135M-Instruct (``riemix.hub.load_model("smollm2-135m")``, cached) learns SST-2 with label
words. The same short run (same seed, data order and initialisation) is repeated without any balancing
regulariser, with Switch load balancing and with the uniform prior; the router gets a large learning
rate and top-1 routing, which makes collapse show up within few steps. For each variant the last
diagnostics window (``diagnostics_every``) gives routing entropy, usage entropy, load CV and dead
experts, and a dev subset gives accuracy. Prints a table and writes
``benchmarks/results/balance_evidence.json`` (``balance_evidence_quick.json`` with ``--quick``).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/balance_evidence.py            # a few minutes
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/balance_evidence.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from lib.harness import script_parser, write_record

VARIANTS = {
    "none": {},
    "load_balance": {"load_balance_coef": 0.1},
    "uniform_prior": {"uniform_prior_coef": 0.1},
}


def run_variant(name: str, extra: dict, args: argparse.Namespace, root: Path) -> dict:
    from riemix.training import TrainConfig, train

    cfg = TrainConfig.from_dict(
        {
            "model": args.model,
            "dataset": args.dataset,
            "train_subset": args.train_subset,
            "eval_subset": args.eval_subset,
            "max_length": 64,
            "batch_size": args.batch_size,
            "max_steps": args.steps,
            "lr": args.lr,
            "gate_lr": args.gate_lr,
            "gate_max_grad_norm": None,
            "eval_before": False,
            "diagnostics_every": args.window,
            "log_every": 1,
            "progress": False,
            "verbose": False,
            "seed": args.seed,
            "output_dir": str(root / name),
            "adapter": {
                "num_experts": args.experts,
                "top_k": args.top_k,
                "rank": 4,
                "alpha": 16.0,
                "target_modules": ["q_proj", "v_proj"],
                "gate_grad_power": 0.5,
            },
            **extra,
        }
    )
    t0 = time.time()
    summary = train(cfg)
    seconds = time.time() - t0
    run = root / name
    diag = json.loads((run / "diagnostics.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [x for x in lines if "diagnostics" in x]
    layers = diag["layers"].values()
    usage = [v["usage_entropy"] for v in layers]
    return {
        "variant": name,
        "regularizer": extra,
        "dev_accuracy": summary["after"].get("accuracy"),
        "final_loss": [x["loss"] for x in lines if "loss" in x][-1],
        "gate_entropy": diag["overall"]["entropy"],
        "usage_entropy": diag["overall"]["usage_entropy"],
        "usage_entropy_min_layer": min(usage),
        "max_entropy": diag["overall"]["max_entropy"],
        "load_cv": diag["overall"]["load_cv"],
        "dead_experts": diag["overall"]["dead_experts"],
        "experts": diag["overall"]["experts"],
        "layers_with_dead": sum(1 for v in layers if v["num_dead"]),
        "usage_entropy_by_window": [[w["step"], w["diagnostics"]["overall"]["usage_entropy"]] for w in windows],
        "seconds": seconds,
    }


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 32 dev sentences")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="glue/sst2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--window", type=int, default=10, help="diagnostics window (steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-subset", type=int, default=1000)
    parser.add_argument("--eval-subset", type=int, default=200)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gate-lr", type=float, default=3e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs-dir", help="keep the run directories here (default: a temporary one)")
    parser.add_argument("--out", help="result JSON (default: results/balance_evidence[_quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.window, args.eval_subset, args.train_subset = 4, 2, 32, 64
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        rows = []
        for name in args.variants:
            rows.append(run_variant(name, VARIANTS[name], args, root))
            brief = {k: v for k, v in rows[-1].items() if k != "usage_entropy_by_window"}
            print(json.dumps(brief), flush=True)
    log_e = math.log(args.experts)
    print(
        f"\n{'variant':<14} {'dev acc':>8} {'gate H':>7} {'usage H':>8} {'min layer':>9} {'(log E)':>7} "
        f"{'load CV':>8} {'dead':>9} {'s':>5}"
    )
    for r in rows:
        acc = f"{r['dev_accuracy']:.4f}" if r["dev_accuracy"] is not None else "-"
        print(
            f"{r['variant']:<14} {acc:>8} {r['gate_entropy']:7.3f} {r['usage_entropy']:8.3f} "
            f"{r['usage_entropy_min_layer']:9.3f} {log_e:7.3f} {r['load_cv']:8.3f} "
            f"{r['dead_experts']:>4}/{r['experts']:<4} {r['seconds']:5.0f}"
        )
    setup = {k: v for k, v in vars(args).items() if k not in ("runs_dir", "out", "variants")}
    record = {
        "setup": setup,
        "note": "last diagnostics window; usage H = entropy of the mean gate, gate H = mean per-token gate "
        "entropy; dead = never selected in the last window",
        "runs": rows,
    }
    write_record(record, "balance_evidence", args.quick, args.out)


if __name__ == "__main__":
    main()
