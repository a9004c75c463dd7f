"""Continual learning on the cl_benchmark task stream: riemix's dynamic experts against sequential PEFT LoRA.

SmolLM2-135M-Instruct, every candidate with the same tasks in the same order, the same steps per task,
batch size, batches (``riemix.continual.run.batch_refs``: a seeded permutation per task, the same replay
draws), prompts (``riemix.continual.stream.presentation``) and evaluation (the test subset of every task
seen so far and the next one after each task; the untrained model first):

- ``peft_seq``: PEFT LoRA (q/k/v/o) trained task after task, its rank matched in trainable parameters to
  riemix's final size, torch AdamW, constant learning rate.
- ``peft_seq_replay``: the same with the same replay buffer (reservoir per task, a share of every batch).
- ``riemix_static``: MoE-LoRA with a fixed number of experts (the dynamic run's final count), every expert
  trained on every task (no growth, no freezing).
- ``riemix_dynamic``: one expert to start; the novelty detector grows one expert per new skill (dense
  routing while it matures, then top-1); the experts of the other skills are frozen while a skill trains.
- ``riemix_dynamic_replay``: the same with the replay buffer.
- ``multitask``: PEFT LoRA on every task jointly, as many steps in all (the upper reference: Avg only).
- ``riemix_skill_routed``: ``riemix_dynamic`` with skill routing instead of maturity routing: every example
  goes to its skill's expert (training: its task's skill; evaluation: the nearest detector centroid).
- ``riemix_dynamic_calibrated``: ``riemix_dynamic`` with the novelty threshold τ₀ = ``CALIBRATED_TAU0``, read
  off ``benchmarks/novelty_margin.py`` (train texts only: between the largest cosine of two different tasks'
  centroids and the smallest of two samples of one task, at 64 texts per centroid) instead of the default.

Learning rates are chosen first (stage ``lr``) per family (PEFT AdamW, riemix Riemannian AdamW) on the
first task: train on its train split minus 100 held-out examples, score those 100.

Resumable: the JSON is rewritten after each (candidate, seed) and a rerun skips what it holds.  Prints a
table and writes ``benchmarks/results/continual_<stream>.json``.

    python benchmarks/continual.py                                  # 4 tasks, seeds 0 and 1
    python benchmarks/continual.py --stream dbpedia,amazon,agnews,yelp,sst2,mnli,rte,boolq --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from lib.harness import RESULTS, record_header, script_parser, write_json

from riemix.continual.config import ContinualConfig
from riemix.continual.metrics import cl_metrics
from riemix.continual.replay import ReplayBuffer, ReplayConfig
from riemix.continual.run import add_exemplars, batch_refs, run_continual
from riemix.continual.stream import label_word_overrides, load_stream, presentation
from riemix.core.config import MoELoRAConfig
from riemix.evaluate import evaluate
from riemix.hub import load_model
from riemix.tasks import TaskModel, collate_lm, encode_train
from riemix.training.data import batch_at, seed_everything

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"
#: Sentiment classes share a first token ("very negative" / "very positive"): one word per class instead.
LABEL_WORDS = [f"{t}=terrible,bad,okay,good,great" for t in ("amazon", "yelp")]
CANDIDATES = (
    "peft_seq",
    "peft_seq_replay",
    "riemix_static",
    "riemix_dynamic",
    "riemix_dynamic_replay",
    "multitask",
    "riemix_skill_routed",
    "riemix_dynamic_calibrated",
)
#: The novelty threshold of ``riemix_dynamic_calibrated`` (``results/novelty_margin.json``, n=64: the largest
#: between-task similarity 0.979, the smallest within-task one 0.989).
CALIBRATED_TAU0 = 0.985
LR_GRID = {"peft": (2e-4, 1e-3, 3e-3, 1e-2), "riemix": (1e-3, 3e-3, 1e-2)}
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args():
    p = script_parser(__doc__)
    p.add_argument("--stream", default="dbpedia,amazon,agnews,yelp")
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--train-subset", type=int, default=400)
    p.add_argument("--eval-subset", type=int, default=100)
    p.add_argument("--replay", type=int, default=32, help="exemplars per task in the replay buffer")
    p.add_argument("--rank", type=int, default=8, help="rank of each riemix expert")
    p.add_argument("--only", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    p.add_argument("--out", default=None)
    p.add_argument(
        "--lr-from",
        default=None,
        help="reuse the learning-rate stage of another results JSON (same first task and training args)",
    )
    return p.parse_args()


def base_cfg(args, seed: int, lr: float, **kw) -> ContinualConfig:
    return ContinualConfig(
        stream=args.stream.split(","),
        data_dir=args.data_dir,
        label_words=[w for w in LABEL_WORDS if w.split("=")[0] in args.stream.split(",")],
        max_length=args.max_length,
        train_subset=args.train_subset,
        eval_subset=args.eval_subset,
        steps_per_task=args.steps,
        batch_size=args.batch_size,
        seed=seed,
        lr=lr,
        progress=False,
        **{"replay_per_task": 0, **kw},
    )


def dynamic_adapter(args) -> MoELoRAConfig:
    return MoELoRAConfig(num_experts=1, top_k=1, rank=args.rank, mature_after_steps=args.steps // 2)


# ---------------------------------------------------------------- riemix candidates
def run_riemix(args, seed: int, lr: float, name: str, static_experts: int) -> dict:
    kw = {
        "riemix_dynamic": {"adapter": dynamic_adapter(args)},
        "riemix_dynamic_replay": {"adapter": dynamic_adapter(args), "replay_per_task": args.replay},
        "riemix_dynamic_calibrated": {"adapter": dynamic_adapter(args), "novelty_threshold": CALIBRATED_TAU0},
        "riemix_skill_routed": {
            "adapter": MoELoRAConfig(num_experts=1, top_k=1, rank=args.rank),
            "skill_routing": True,
        },
        "riemix_static": {
            "grow": "never",
            "freeze": "never",
            "adapter": MoELoRAConfig(num_experts=static_experts, top_k=1, rank=args.rank),
        },
    }[name]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(base_cfg(args, seed, lr), output_dir=str(Path(tmp) / "run"), **kw)
        t0 = time.time()
        res = run_continual(cfg, log=lambda msg: print(f"  [{name} s{seed}] {msg}", flush=True))
    return {
        "matrix": res["matrix"],
        "zero_shot": res["zero_shot"],
        **{k: res[k] for k in ("avg", "avg_incremental", "bwt", "fwt", "trainable_params")},
        "experts": [max(h["experts"].values()) for h in res["experts"]],
        "skills": res["skills"],
        "decisions": [{k: d[k] for k in ("task", "reason", "similarities", "threshold")} for d in res["decisions"]],
        "growth_seconds": [g["seconds"] for g in res["growth"]],
        "seconds": time.time() - t0,
    }


# ---------------------------------------------------------------- PEFT candidates
def peft_model(args, seed: int, rank: int):
    from peft import LoraConfig, get_peft_model

    seed_everything(seed)
    model, tok = load_model("smollm2-135m")
    model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PEFT_TARGETS)
    )
    return model.base_model.model, tok  # the adapted transformers model (TaskModel reads its base_model)


def run_peft(args, seed: int, lr: float, name: str, rank: int) -> dict:
    cfg = base_cfg(args, seed, lr, replay_per_task=args.replay if name == "peft_seq_replay" else 0)
    t0 = time.time()
    model, tok = peft_model(args, seed, rank)
    tasks = load_stream(cfg.stream, cfg.data_dir, label_word_overrides(cfg.label_words), cfg.eval_subset)
    tasks = [replace(t, train=t.train.subset(min(cfg.train_subset, len(t.train)), seed=seed)) for t in tasks]
    views = [presentation(t, tok, cfg.max_length) for t in tasks]
    items = [[encode_train(ex, spec, tok) for ex in train.examples] for train, _, spec in views]
    tm = TaskModel(model, "causal_lm")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    replay = ReplayBuffer(
        ReplayConfig(capacity_per_skill=max(1, cfg.replay_per_task), ratio=cfg.replay_ratio, seed=seed)
    )

    def acc(i: int) -> float:
        _, test, spec = views[i]
        return float(evaluate(tm, test, spec, tok, cfg.eval_batch_size)["accuracy"])

    def step(refs) -> None:
        batch = collate_lm([items[t][i] for t, i in refs], tok.pad_token_id)
        loss = tm(batch, mode="loss_sum") / max(TaskModel.num_targets(batch), 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    n = len(tasks)
    zero = [acc(i) for i in range(n)]
    if name == "multitask":  # every task jointly, as many steps in all, scored once at the end
        union = [[t, i] for t in range(n) for i in range(len(items[t]))]
        for s in range(cfg.steps_per_task * n):
            step([union[j] for j in batch_at(list(range(len(union))), s, cfg.batch_size, seed)])
        row = [acc(i) for i in range(n)]
        return {
            "matrix": [row],
            "zero_shot": zero,
            "avg": sum(row) / n,
            "avg_incremental": None,
            "bwt": None,
            "fwt": None,
            "trainable_params": _trainable(model),
            "seconds": time.time() - t0,
        }
    matrix = []
    for k in range(n):
        for s in range(cfg.steps_per_task):
            step(batch_refs(cfg, k, s, len(items[k]), replay))
        if cfg.replay_per_task:
            add_exemplars(cfg, replay, k, len(items[k]))
        matrix.append([acc(i) if i <= k + 1 else None for i in range(n)])
        print(
            f"  [{name} s{seed}] after {tasks[k].name}: {[None if v is None else round(v, 3) for v in matrix[-1]]}",
            flush=True,
        )
    return {
        "matrix": matrix,
        "zero_shot": zero,
        **cl_metrics([r[:n] for r in matrix], zero),
        "trainable_params": _trainable(model),
        "seconds": time.time() - t0,
    }


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- learning rates
def holdout_accuracy(args, family: str, lr: float) -> float:
    """Train ``steps`` steps on the first task's first ``train_subset`` examples; score the next 100."""
    first = args.stream.split(",")[0]
    with tempfile.TemporaryDirectory() as tmp:
        _holdout_folder(args, first, Path(tmp))
        one = argparse.Namespace(**{**vars(args), "stream": first, "data_dir": tmp, "eval_subset": None})
        if family == "riemix":
            cfg = replace(base_cfg(one, 0, lr), adapter=dynamic_adapter(args), output_dir=str(Path(tmp) / "run"))
            return run_continual(cfg, log=lambda msg: None)["matrix"][0][0]
        return run_peft(one, 0, lr, "peft_seq", rank=4 * args.rank)["matrix"][0][0]


#: The arguments the learning-rate stage depends on (besides the stream's first task).
LR_STAGE_ARGS = ("steps", "batch_size", "max_length", "train_subset", "rank")


def reused_lrs(args, path: Path) -> dict:
    """The ``lr_selection`` of another run of this script, refused unless its stage was the same computation."""
    other = json.loads(path.read_text(encoding="utf-8"))
    first = args.stream.split(",")[0]
    if other["stream"][0] != first:
        raise SystemExit(f"--lr-from {path}: its stream starts with {other['stream'][0]!r}, not {first!r}")
    for key in LR_STAGE_ARGS:
        if other["args"][key] != getattr(args, key):
            raise SystemExit(f"--lr-from {path}: its {key} is {other['args'][key]!r}, not {getattr(args, key)!r}")
    print(f"learning-rate stage reused from {path.name}", flush=True)
    return other["lr_selection"]


def _holdout_folder(args, task: str, tmp: Path) -> None:
    src = Path(args.data_dir) / task
    rows = (src / "train.jsonl").read_text(encoding="utf-8").splitlines()
    rows = rows[: args.train_subset + 100]
    out = tmp / task
    out.mkdir()
    (out / "train.jsonl").write_text("\n".join(rows[:-100]) + "\n", encoding="utf-8")
    (out / "test.jsonl").write_text("\n".join(rows[-100:]) + "\n", encoding="utf-8")
    if (src / "labels.json").is_file():
        (out / "labels.json").write_text((src / "labels.json").read_text(encoding="utf-8"), encoding="utf-8")


# ---------------------------------------------------------------- aggregation
def mean_entry(per_seed: dict) -> dict:
    runs = list(per_seed.values())
    out = {"seeds": sorted(int(s) for s in per_seed), "per_seed": per_seed}
    for key in ("avg", "avg_incremental", "bwt", "fwt", "seconds", "trainable_params"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.fmean(vals) if vals else None
    rows = [r["matrix"] for r in runs]
    out["matrix"] = [
        [None if rows[0][k][i] is None else statistics.fmean(m[k][i] for m in rows) for i in range(len(rows[0][k]))]
        for k in range(len(rows[0]))
    ]
    out["experts"] = runs[0].get("experts")
    return out


def table(record: dict) -> str:
    lines = [
        f"stream {' -> '.join(record['stream'])}",
        f"{'candidate':24s} {'Avg':>6s} {'AvgInc':>6s} {'BWT':>7s} {'FWT':>7s} {'params':>9s} {'s':>6s} seeds",
    ]
    for name, c in record["candidates"].items():

        def f(v, w=6):
            return f"{v:{w}.3f}" if v is not None else " " * (w - 1) + "-"

        lines.append(
            f"{name:24s} {f(c['avg'])} {f(c['avg_incremental'])} {f(c['bwt'], 7)} {f(c['fwt'], 7)} "
            f"{int(c['trainable_params'] or 0):9d} {c['seconds']:6.0f} {c['seeds']}"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    stream = args.stream.split(",")
    path = Path(args.out) if args.out else RESULTS / f"continual_{'_'.join(stream)}.json"
    record = json.loads(path.read_text()) if path.is_file() else {**record_header("continual"), "stream": stream}
    if record["stream"] != stream:
        raise SystemExit(f"{path} holds the stream {record['stream']}, not {stream}")
    record["args"] = {k: v for k, v in vars(args).items() if k not in ("only", "seeds", "out", "data_dir")}
    raw = record.setdefault("raw", {})
    lrs = record.setdefault("lr_selection", {})
    if args.lr_from:
        lrs.update({k: v for k, v in reused_lrs(args, Path(args.lr_from)).items() if k not in lrs})
    for family, grid in LR_GRID.items():
        for lr in grid:
            key = f"{family}:{lr:g}"
            if key not in lrs:
                lrs[key] = holdout_accuracy(args, family, lr)
                print(f"lr {key}: held-out accuracy {lrs[key]:.3f}", flush=True)
                write_json(path, record)
    best = {fam: max(grid, key=lambda lr, fam=fam: lrs[f"{fam}:{lr:g}"]) for fam, grid in LR_GRID.items()}
    record["lr"] = best
    # riemix_dynamic first (its final expert count sizes the others), then the headline comparisons
    first = ["riemix_dynamic", "riemix_skill_routed", "peft_seq"]
    order = [*first, *[c for c in CANDIDATES if c not in first]]
    for seed in args.seeds:
        for name in order:
            if name not in args.only or str(seed) in raw.get(name, {}):
                continue
            dyn = raw.get("riemix_dynamic", {}).get(str(seed)) or next(
                iter(raw.get("riemix_dynamic", {}).values()), None
            )
            experts = dyn["experts"][-1] if dyn else len(stream)
            print(f"{name} seed {seed}", flush=True)
            if name.startswith("riemix"):
                result = run_riemix(args, seed, best["riemix"], name, experts)
            else:  # PEFT rank with as many trainable parameters as riemix's final size (routers aside)
                result = run_peft(args, seed, best["peft"], name, rank=experts * args.rank)
            raw.setdefault(name, {})[str(seed)] = result
            record["candidates"] = {c: mean_entry(raw[c]) for c in CANDIDATES if c in raw}
            write_json(path, record)
            print(table(record), flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
