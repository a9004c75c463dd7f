"""Quality of the paper's optimizer comparisons at small scale, on real data, side by side in one run.

Candidates (same model, data, batches, steps, batch size and linear-decay schedule for all; riemix runs use
the default MoE-LoRA adapter E=8 / top-2 / r=4 on q/k/v/o unless ``--adapter`` overrides it):

====================  =========================================================================
``sgd``               MoE-LoRA + plain SGD                  (gate power p=1: plain MoE-LoRA)
``rsgd``              MoE-LoRA + RiemannianSGD              (p=1)
``grsgd_p0.5``        MoE-LoRA + RiemannianSGD              (p=0.5, the paper's sqrt rescaling)
``grsgd_p0``          MoE-LoRA + RiemannianSGD              (p=0, the paper's eq. 12)
``grsgd_p0.5_ownlr``  as ``grsgd_p0.5``, but with a learning-rate sweep of its own
``grsgd_p0_ownlr``    as ``grsgd_p0``, but with a learning-rate sweep of its own
``adamw``             MoE-LoRA + plain AdamW                (p=1)
``radamw``            MoE-LoRA + RiemannianAdamW            (p=1)
``gradamw_p0.5``      MoE-LoRA + RiemannianAdamW            (p=0.5)
``gradamw_p0``        MoE-LoRA + RiemannianAdamW            (p=0)
``peft_adamw``        PEFT LoRA, rank = E*r (comparable trainable parameters) + torch AdamW
====================  =========================================================================

Learning rates are tuned honestly: each *family* (``sgd``; ``rsgd`` and its gated variants; ``adamw``;
``radamw`` and its gated variants; ``peft_adamw``) sweeps a small grid on a held-out 10% of the *train*
split (``Dataset.split(0.9, seed=0)``), training on the other 90% for ``--sweep-steps``; the family's
base member (p=1) is swept and the gated members use its learning rate, as in the paper (the ``_ownlr``
candidates are their own family, so they get their own sweep: gate rescaling changes the effective step
size, so the best learning rate can move). The reported
split (dev/test) is never used for choosing. Final runs train on the full train split, and report
accuracy (the task's primary metric) on a fixed subset of the reported split after ``--early-step``
steps and at the end, for each seed. For scored tasks each run also stores which evaluated examples it
got right (``early_hits`` / ``final_hits``, a string of 0/1 in the subset's order), so two candidates can be
compared paired (McNemar) on the same examples.

Runs go to ``--workers`` processes with one thread each (with several workers, each is pinned to its own core
where possible; a single worker is not pinned, so two comparisons can run side by side with ``--workers 1``).
Results are written after every finished run to
``benchmarks/results/quality_<model>_<task>_<cloze|letter|labelwords|head>.json``;
re-running the same command skips runs already there, so an interrupted comparison resumes.

    python benchmarks/quality_compare.py --task commonsense_qa --data-dir ../shared/data
    python benchmarks/quality_compare.py --task commonsense_qa --quick           # smoke run
    python benchmarks/quality_compare.py --task commonsense_qa --summary          # re-print the table
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from lib.harness import RESULTS, record_header, script_parser, write_json
from lib.runner import batch_source, train_loop
from lib.stats import hits_string, majority_baseline, pct, primary_score

from riemix.tasks import FORMATS, MODEL_KINDS

#: candidate -> (family, optimizer name or "peft", gate_grad_power)
CANDIDATES: dict[str, tuple[str, str, float]] = {
    "sgd": ("sgd", "sgd", 1.0),
    "rsgd": ("rsgd", "rsgd", 1.0),
    "grsgd_p0.5": ("rsgd", "rsgd", 0.5),
    "grsgd_p0": ("rsgd", "rsgd", 0.0),
    "grsgd_p0.5_ownlr": ("grsgd_p0.5_ownlr", "rsgd", 0.5),
    "grsgd_p0_ownlr": ("grsgd_p0_ownlr", "rsgd", 0.0),
    "adamw": ("adamw", "adamw", 1.0),
    "radamw": ("radamw", "radamw", 1.0),
    "gradamw_p0.5": ("radamw", "radamw", 0.5),
    "gradamw_p0": ("radamw", "radamw", 0.0),
    "peft_adamw": ("peft_adamw", "peft", 1.0),
}
#: learning-rate grid swept per family (the base member is swept; gated members inherit its choice)
LR_GRID: dict[str, list[float]] = {
    "sgd": [0.03, 0.1, 0.3, 1.0],
    "rsgd": [0.003, 0.01, 0.03, 0.1],
    "adamw": [3e-4, 1e-3, 3e-3],
    "radamw": [3e-4, 1e-3, 3e-3],
    "grsgd_p0.5_ownlr": [3e-4, 1e-3, 3e-3],
    "grsgd_p0_ownlr": [3e-4, 1e-3, 3e-3],
    "peft_adamw": [1e-4, 3e-4, 1e-3],
}
#: family -> the candidate whose sweep picks the family's learning rate
FAMILY_BASE = {fam: fam for fam in LR_GRID}
#: options that define the protocol: a results file is only resumed with the same values
PROTOCOL = (
    "steps",
    "early_step",
    "batch_size",
    "eval_subset",
    "sweep_steps",
    "sweep_subset",
    "adapter",
    "format",
    "max_length",
)
__all__ = [
    "CANDIDATES",
    "check_protocol",
    "choose_lrs",
    "hits_string",
    "majority_baseline",
    "result_stem",
    "run_job",
    "summarize",
    "sweep_runs",
]


def _init_worker(cores: list[int], counter) -> None:
    """One thread per worker, each worker pinned to its own core (when the platform allows it)."""
    import torch

    torch.set_num_threads(1)
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cores[slot % len(cores)]})


def _data(job: dict):
    from riemix.data import load_dataset

    train = load_dataset(job["task"], "train", job["data_dir"])
    if job["stage"] == "sweep":
        train, held = train.split(0.9, seed=0)
        return train, held.subset(min(job["eval_subset"], len(held)), seed=0)
    dev = load_dataset(job["task"], "dev", job["data_dir"])
    return train, dev.subset(min(job["eval_subset"], len(dev)), seed=0)


def _build(job: dict, train_ds):
    """Model (adapted), tokenizer, optimizer and trainable-parameter count for one candidate."""
    import torch

    from riemix import MoELoRAConfig, add_moe_lora, build_optimizer
    from riemix.hub import HEAD_NAMES, load_model, num_labels_for

    num_labels = num_labels_for(train_ds, job["model_kind"])
    model, tok = load_model(job["model"], task=job["model_kind"], num_labels=num_labels)
    if job["candidate"] == "zero_shot":
        return model, tok, None, 0
    family, opt_name, power = CANDIDATES[job["candidate"]]
    if opt_name == "peft":
        from peft import LoraConfig, get_peft_model

        adapter = MoELoRAConfig(**job["adapter"])  # the defaults: the default job's adapter
        rank = adapter.num_experts * adapter.rank
        model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=adapter.target_modules)
        ).base_model.model
    else:
        add_moe_lora(model, MoELoRAConfig(**job["adapter"], gate_grad_power=power))
    if job["model_kind"] == "sequence_classification":
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in HEAD_NAMES:
                module.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if opt_name == "peft":
        opt = torch.optim.AdamW(trainable, lr=job["lr"], weight_decay=0.0, foreach=True)
    else:
        opt = build_optimizer(model, opt_name, lr=job["lr"], gate_max_grad_norm=1.0)
    return model, tok, opt, sum(p.numel() for p in trainable)


def run_job(job: dict) -> dict:
    """Train one (stage, candidate, lr, seed) and evaluate it; returns the result row."""
    from riemix.evaluate import predict
    from riemix.tasks import TaskModel, TaskSpec
    from riemix.training.data import encode_items, seed_everything

    t0 = time.time()
    train_ds, eval_ds = _data(job)
    seed_everything(job["seed"])
    model, tok, opt, n_trainable = _build(job, train_ds)
    overrides = {"max_length": job["max_length"]} if job.get("max_length") else {}
    spec = TaskSpec.for_dataset(train_ds, job["model_kind"], format=job["format"], **overrides)
    tm = TaskModel(model, job["model_kind"])
    row = {k: job[k] for k in ("stage", "candidate", "lr", "seed", "steps")}
    row["trainable_params"] = n_trainable

    targets = eval_ds.targets()

    def score(point: str) -> None:
        preds = predict(tm, eval_ds, spec, tok, job["eval_batch_size"])["preds"]
        row[point] = primary_score(eval_ds.metric, preds, targets)
        if eval_ds.task != "regression":
            row[f"{point}_hits"] = hits_string(preds, targets)

    if job["candidate"] == "zero_shot":
        score("final")
        return {**row, "seconds": time.time() - t0}
    items = encode_items([train_ds], [spec], tok, job["model_kind"])
    batches = batch_source(items, tok, job["model_kind"], spec.max_length, job["batch_size"], job["seed"])

    def after_step(step: int) -> None:
        if job["early_step"] and step + 1 == job["early_step"] and job["early_step"] < job["steps"]:
            score("early")

    loop = train_loop(tm, opt, batches, job["steps"], after_step)
    if loop.diverged_at is not None:  # NaN/inf loss: stopped early, reported as such
        row["diverged_at"] = loop.diverged_at
        row["final"] = float("nan")
    else:
        score("final")
    if job["early_step"] == job["steps"]:
        row["early"] = row["final"]
        if "final_hits" in row:
            row["early_hits"] = row["final_hits"]
    tail = loop.losses[-10:]
    row.update(final_loss=sum(tail) / len(tail), train_seconds=loop.train_seconds, seconds=time.time() - t0)
    return row


def result_stem(model: str, task: str, formulation: str, quick: bool = False) -> str:
    """Default results file name (no ``.json``): ``quality_<model>_<task>_<formulation>[_quick]``."""
    return f"quality_{model}_{task.replace('/', '_')}_{formulation}{'_quick' if quick else ''}"


def sweep_runs(record: dict) -> list[dict]:
    """The record's learning-rate sweep rows, ordered by (family, lr)."""
    return sorted((r for r in record["runs"] if r["stage"] == "sweep"), key=lambda r: (r["candidate"], r["lr"]))


def _job(
    base: dict, stage: str, candidate: str, lr: float, seed: int, steps: int, early_step: int, eval_subset: int
) -> dict:
    """One run for ``run_job``: the shared options ``base`` plus what identifies and sizes this run."""
    return {
        **base,
        "stage": stage,
        "candidate": candidate,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "early_step": early_step,
        "eval_subset": eval_subset,
    }


def _key(row: dict) -> str:
    return f"{row['stage']}|{row['candidate']}|{row['lr']:g}|{row['seed']}"


def choose_lrs(rows: list[dict]) -> dict[str, float]:
    """Per family, the swept learning rate with the best held-out score (ties: the smaller lr)."""
    chosen = {}
    for family, base in FAMILY_BASE.items():
        cands = [r for r in rows if r["stage"] == "sweep" and r["candidate"] == base]
        ok = [r for r in cands if r["final"] == r["final"]]
        if ok:
            chosen[family] = max(ok, key=lambda r: (r["final"], -r["lr"]))["lr"]
    return chosen


def summarize(record: dict) -> dict[str, dict[str, Any]]:
    """Mean / std (over seeds) of the early and final scores per candidate, at its family's chosen lr.

    Final runs at another learning rate (from before a sweep was extended and changed the choice) stay in
    ``record["runs"]`` but are not summarised.
    """
    out: dict[str, dict[str, Any]] = {}
    chosen = record.get("chosen_lr", {})
    for cand in ["zero_shot", *CANDIDATES]:
        lr = chosen.get(CANDIDATES[cand][0]) if cand in CANDIDATES else None
        rows = [
            r
            for r in record["runs"]
            if r["stage"] == "final" and r["candidate"] == cand and (lr is None or r["lr"] == lr)
        ]
        if not rows:
            continue
        entry: dict[str, Any] = {"seeds": sorted(r["seed"] for r in rows), "lr": rows[0]["lr"]}
        for point in ("early", "final"):
            vals = [r[point] for r in rows if point in r]
            if vals:
                entry[point] = statistics.fmean(vals)
                entry[f"{point}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
                entry[f"{point}_all"] = vals
        entry["trainable_params"] = rows[0].get("trainable_params")
        out[cand] = entry
    return out


def print_tables(record: dict) -> None:
    a = record["args"]
    form = record.get("formulation", a["format"])
    print(f"\n{a['task']} ({form}), {a['model']}: sweep on held-out train ({a['sweep_steps']} steps)")
    print(f"{'candidate':<18} {'lr':>8} {'held-out':>9}")
    for r in sweep_runs(record):
        print(f"{r['candidate']:<18} {r['lr']:8.0e} {r['final']:9.4f}")
    print(f"chosen: {record.get('chosen_lr')}")
    print(f"\nreported split subset ({a['eval_subset']}), {a['steps']} steps x batch {a['batch_size']}")
    print(f"{'candidate':<18} {'lr':>8} {'@' + str(a['early_step']):>15} {'end':>15} {'params':>9} seeds")
    for cand, e in record.get("summary", {}).items():
        early, final, params = pct(e, "early"), pct(e, "final"), e["trainable_params"] or 0
        print(f"{cand:<18} {e['lr']:8.0e} {early:>15} {final:>15} {params:9d} {e['seeds']}")


def check_protocol(record: dict, arg_rec: dict, out: Path) -> None:
    """Refuse to resume ``record`` (loaded from ``out``) with options that change the protocol.

    Raises:
        SystemExit: naming the file and the saved values that differ.
    """
    changed = [k for k in PROTOCOL if k in record.get("args", {}) and record["args"][k] != arg_rec[k]]
    if changed:
        old = ", ".join(f"{k}={record['args'][k]!r}" for k in changed)
        raise SystemExit(
            f"{out} holds runs made with other {old}; "
            "resuming would mix protocols. Pass the same options, or --out for a new file."
        )


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--task", default="commonsense_qa")
    parser.add_argument("--format", default="cloze", choices=FORMATS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-kind", default="causal_lm", choices=MODEL_KINDS)
    parser.add_argument("--data-dir", default=os.environ.get("RIEMIX_DATA_DIR"))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--adapter", type=json.loads, default={}, help="JSON overrides, e.g. '{\"rank\": 8}'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--early-step", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-subset", type=int, default=250)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None, help="token budget per sequence (task default)")
    parser.add_argument("--sweep-steps", type=int, default=60)
    parser.add_argument("--sweep-subset", type=int, default=200)
    parser.add_argument("--lr", type=json.loads, default={}, help="fixed lr per family (skips its sweep)")
    parser.add_argument("--lr-grid", type=json.loads, default={}, help="grid per family, e.g. '{\"adamw\": [1e-3]}'")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 16 eval examples, 1 lr, 1 seed")
    parser.add_argument("--summary", action="store_true", help="only re-print the tables of the saved JSON")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.early_step, args.sweep_steps, args.seeds = 4, 2, 2, [0]
        args.eval_subset = args.sweep_subset = 16
    from riemix.data import load_dataset

    dev = load_dataset(args.task, "dev", args.data_dir)
    task_type = dev.task
    formulation = (
        "head"
        if args.model_kind == "sequence_classification"
        else (args.format if task_type == "mcq" else "labelwords")
    )
    out = args.out or RESULTS / f"{result_stem(args.model, args.task, formulation, args.quick)}.json"
    record = json.loads(out.read_text()) if out.exists() else {}
    if args.summary:
        print_tables(record)
        return
    arg_rec = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    check_protocol(record, arg_rec, out)
    record = {
        **record_header("quality_compare"),
        "args": arg_rec,
        "formulation": formulation,
        "metric": dev.metric,
        "majority_baseline": majority_baseline(dev.subset(min(args.eval_subset, len(dev)), seed=0)),
        "runs": record.get("runs", []),
    }
    done = {_key(r) for r in record["runs"]}
    base = {
        k: getattr(args, k)
        for k in (
            "task",
            "format",
            "model",
            "model_kind",
            "data_dir",
            "adapter",
            "eval_batch_size",
            "batch_size",
            "max_length",
        )
    }
    families = sorted({CANDIDATES[c][0] for c in args.candidates})
    sweep_jobs = []
    for fam in families:
        if fam in args.lr:
            continue
        grid = args.lr_grid.get(fam, LR_GRID[fam])
        grid = grid[len(grid) // 2 :][:1] if args.quick else grid
        for lr in grid:
            sweep_jobs.append(_job(base, "sweep", FAMILY_BASE[fam], lr, 0, args.sweep_steps, 0, args.sweep_subset))
    ctx = get_context("spawn")
    counter = ctx.Value("i", 0)
    # pin only a pool of several workers; one worker is left to the OS scheduler, so that two comparisons
    # started side by side with --workers 1 do not both land on the first core
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") and args.workers > 1 else []

    def run_all(jobs: list[dict], pool) -> None:
        todo = [j for j in jobs if _key(j) not in done]
        futures = {pool.submit(run_job, j): j for j in todo}
        for fut in as_completed(futures):
            row = fut.result()
            record["runs"].append(row)
            done.add(_key(row))
            record["chosen_lr"] = {**choose_lrs(record["runs"]), **args.lr}
            record["summary"] = summarize(record)
            write_json(out, record)
            print(json.dumps(row), flush=True)

    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker, initargs=(cores, counter)) as pool:
        run_all(sweep_jobs, pool)
        chosen = {**choose_lrs(record["runs"]), **args.lr}
        final_jobs = []
        if args.model_kind == "causal_lm":  # an encoder's new head is random before training
            final_jobs.append(_job(base, "final", "zero_shot", 0.0, 0, 0, 0, args.eval_subset))
        for seed in args.seeds:  # every candidate for one seed before the next seed
            for cand in args.candidates:
                lr = chosen[CANDIDATES[cand][0]]
                final_jobs.append(_job(base, "final", cand, lr, seed, args.steps, args.early_step, args.eval_subset))
        run_all(final_jobs, pool)
    record["chosen_lr"] = chosen
    record["summary"] = summarize(record)
    write_json(out, record)
    print_tables(record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
