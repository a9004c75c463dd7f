"""How far apart the novelty detector's skills are on the cl_benchmark tasks, and how much a sample moves them.

``riemix continual`` calls a task a new skill when the cosine similarity of its embedding centroid (the
L2-normalised mean of ``novelty_samples`` base-model embeddings, ``riemix.continual.embedding``) to every
known skill's centroid is below τₖ = τ₀ − δ·log(1 + k).  This script measures, on SmolLM2-135M and the real
task data, what that threshold has to separate:

- **within**: the similarity of two disjoint random samples of the *same* task (should stay above τₖ);
- **between**: the similarity of samples of two *different* tasks (should fall below τₖ),

for several sample sizes, over many random draws, and counts the draws that the default threshold decides
wrongly (a pair of tasks in ``SAME_SKILL`` is not counted either way: amazon and yelp are both five-star
review ratings).  Every text is embedded once (a pool per task); the draws only index the pool.

    python benchmarks/novelty_margin.py                      # all nine tasks, n = 32, 64, 128, 256
"""

from __future__ import annotations

import itertools
import random
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from lib.harness import RESULTS, record_header, script_parser, write_json

from riemix.continual.config import ContinualConfig
from riemix.continual.embedding import embed_texts
from riemix.continual.novelty import adaptive_threshold
from riemix.continual.stream import load_stream
from riemix.hub import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"
TASKS = ("dbpedia", "amazon", "agnews", "yelp", "sst2", "mnli", "rte", "boolq", "imdb")
#: Task pairs that are one skill (the same kind of input and label), left out of the error counts.
SAME_SKILL = {frozenset(("amazon", "yelp")), frozenset(("sst2", "imdb"))}


def parse_args():
    p = script_parser(__doc__)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--samples", type=int, nargs="+", default=[32, 64, 128, 256], help="texts per centroid")
    p.add_argument("--pool", type=int, default=512, help="texts embedded per task (draws are disjoint within it)")
    p.add_argument("--draws", type=int, default=20, help="random draws per sample size")
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--out", default=str(RESULTS / "novelty_margin.json"))
    return p.parse_args()


def centroid(emb: torch.Tensor) -> torch.Tensor:
    """The detector's batch centroid: the L2-normalised mean of the raw embeddings (``NoveltyDetector``)."""
    return F.normalize(emb.mean(0), dim=0)  # (H,)


def margins(pools: dict[str, torch.Tensor], n: int, draws: int, thresholds: list[float]) -> dict:
    """Within- and between-task similarities of ``draws`` random pairs of size-``n`` samples."""
    rng = random.Random(n)
    within: dict[str, list[float]] = {t: [] for t in pools}
    between: dict[str, list[float]] = {f"{a}|{b}": [] for a, b in itertools.combinations(pools, 2)}
    for _ in range(draws):
        halves = {}
        for task, pool in pools.items():
            idx = rng.sample(range(len(pool)), 2 * n)
            halves[task] = (centroid(pool[idx[:n]]), centroid(pool[idx[n:]]))
            within[task].append(float(halves[task][0] @ halves[task][1]))
        for a, b in itertools.combinations(pools, 2):
            between[f"{a}|{b}"].append(float(halves[a][0] @ halves[b][1]))
    distinct = [k for k in between if frozenset(k.split("|")) not in SAME_SKILL]
    errors = {
        f"{tau:.4f}": {
            "same_task_called_novel": sum(v < tau for vals in within.values() for v in vals),
            "other_task_called_known": sum(v >= tau for k in distinct for v in between[k]),
            "comparisons": (len(within) * draws, len(distinct) * draws),
        }
        for tau in thresholds
    }
    return {
        "within_min": min(min(v) for v in within.values()),
        "between_max": max(max(between[k]) for k in distinct),
        "within": {t: _summary(v) for t, v in within.items()},
        "between": {k: _summary(v) for k, v in between.items()},
        "errors": errors,
    }


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values), "min": min(values), "max": max(values)}


def main() -> None:
    args = parse_args()
    tasks = args.tasks.split(",")
    if 2 * max(args.samples) > args.pool:
        raise SystemExit(f"--pool {args.pool} is too small for two disjoint samples of {max(args.samples)}")
    model, tokenizer = load_model("smollm2-135m")
    stream = load_stream(tasks, data_dir=args.data_dir)
    pools = {}
    for task in stream:
        examples = task.train.subset(min(args.pool, len(task.train)), seed=0).examples
        texts = [ex.text + (f"\n{ex.text_pair}" if ex.text_pair else "") for ex in examples]
        pools[task.name] = embed_texts(model, tokenizer, texts, max_length=args.max_length)  # (pool, H)
        print(f"embedded {len(texts)} texts of {task.name}", flush=True)
    defaults = ContinualConfig(stream=["x"])
    thresholds = [adaptive_threshold(defaults.novelty_threshold, defaults.novelty_delta, k) for k in (1, 3, 7)]
    record = {
        **record_header("novelty_margin"),
        "args": vars(args),
        "thresholds_k1_k3_k7": thresholds,
        "same_skill": [sorted(pair) for pair in SAME_SKILL],
    }
    record["by_samples"] = {str(n): margins(pools, n, args.draws, thresholds) for n in args.samples}
    write_json(args.out, record)
    print(table(record))
    print(f"wrote {args.out}")


def table(record: dict) -> str:
    """Per sample size: the worst within-task and between-task similarity, and the errors per threshold."""
    taus = list(next(iter(record["by_samples"].values()))["errors"])
    head = f"{'n':>5s} {'within min':>10s} {'between max':>11s} " + " ".join(f"{'err@' + t:>13s}" for t in taus)
    lines = [head]
    for n, m in record["by_samples"].items():
        errs = " ".join(
            f"{e['same_task_called_novel']:>5d}/{e['other_task_called_known']:<7d}" for e in m["errors"].values()
        )
        lines.append(f"{n:>5s} {m['within_min']:10.4f} {m['between_max']:11.4f} {errs}")
    lines.append("err = same task called novel / other task called known (pairs in SAME_SKILL not counted)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
