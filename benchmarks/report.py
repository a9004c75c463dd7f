"""Render ``docs/benchmarks.md`` (tables) and ``docs/img/*.png`` (plots) from ``benchmarks/results/*.json``.

Every number in the document comes from a committed JSON file, so the docs can be checked against them.

    python benchmarks/report.py
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from lib.harness import RESULTS, script_parser
from lib.stats import pct
from quality_compare import CANDIDATES, result_stem, sweep_runs

from riemix.io.fileio import atomic_write, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _bar(path: Path, labels: list[str], values: list[float], title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(labels)))
    ax.barh(labels, values, color="#4c72b0")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center")
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _table(header: list[str], rows: Iterable[Iterable[str]], left: int = 1) -> list[str]:
    """A Markdown table's lines: the first ``left`` columns left-aligned, the others right-aligned (numbers)."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * left + "---:|" * (len(header) - left),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _machine(rec: dict) -> str:
    m = rec["machine"]
    return f"{rec['date'][:10]}, {m['platform']}, {m['cpu_threads']} threads, torch {m['torch']}"


def layer_section(rec: dict) -> list[str]:
    a, med = rec["args"], rec["median_seconds"]
    lines = [
        "## Layer: forward + backward of one MoE-LoRA layer",
        "",
        f"`benchmarks/layer_speed.py`: E={a['experts']}, top-k={a['top_k']}, r={a['rank']}, "
        f"in=out={a['width']}, {a['tokens']} tokens, {a['dtype']}, median of {a['repeats']} interleaved repeats "
        f"({_machine(rec)}).",
        "",
        *_table(
            ["candidate", "ms", "vs frozen base"],
            ([n, f"{1e3 * t:.1f}", f"{t / med['base']:.2f}x"] for n, t in med.items()),
        ),
        "",
    ]
    targets = {"riemix_over_base": "<= 1.3", "loop_over_riemix": ">= 8", "riemix_over_peft_lora": "<= 1.1"}
    lines += _table(
        ["ratio", "measured", "target"], ([k, f"{v:.2f}", targets.get(k, "")] for k, v in rec["ratios"].items())
    )
    lines += [
        "",
        f"No adapter can beat the frozen base, so loop/riemix is bounded by loop/base = "
        f"{med['loop'] / med['base']:.2f} on this shape: the >= 8x target is out of reach here whatever the "
        "adapter costs (the loop's own overhead over the base is "
        f"{(med['loop'] - med['base']) / max(med['riemix'] - med['base'], 1e-9):.0f}x riemix's).",
    ]
    _bar(IMG / "layer_speed.png", list(med), [1e3 * t for t in med.values()], "MoE-LoRA layer fwd+bwd", "ms")
    return lines + ["", "![layer speed](img/layer_speed.png)", ""]


def layer_sweep_section(rec: dict) -> list[str]:
    b = rec["base_point"]
    lines = [
        "### Layer speed across sizes and dtypes",
        "",
        f"`benchmarks/layer_sweep.py`: one factor at a time around E={b['experts']}, top-k={b['top_k']}, "
        f"r={b['rank']}, in=out={b['width']}, {b['tokens']} tokens; median of {rec['repeats']} interleaved repeats "
        f"({_machine(rec)}). `peft` is PEFT LoRA of rank E·r.",
        "",
        "| varied | E | k | r | width | dtype | base ms | riemix/base | loop/riemix | riemix/peft |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for p in rec["points"]:
        peft = p["riemix_over_peft_lora"]
        lines.append(
            f"| {p['varied']} | {p['experts']} | {p['top_k']} | {p['rank']} | {p['width']} | {p['dtype']} | "
            f"{1e3 * p['median_seconds']['base']:.1f} | {p['riemix_over_base']:.2f} | {p['loop_over_riemix']:.2f} | "
            f"{'-' if peft is None else f'{peft:.2f}'} |"
        )
    return lines + [
        "",
        "This CPU has no bf16 matrix units (no AVX512-BF16/AMX), so bf16 matmuls run far slower than fp32 and "
        "the bf16 rows mostly measure that; they show the layer works in bf16, not how fast it would be on "
        "bf16 hardware.",
        "",
    ]


def optimizer_section(rec: dict) -> list[str]:
    a, med = rec["args"], rec["median_seconds"]
    lines = [
        "## Optimizer step",
        "",
        f"`benchmarks/optimizer_speed.py`: {a['layers']} layers x E={a['experts']} experts x rank {a['rank']}, "
        f"width {a['width']}, plus routers (clipped), fp32, median of {a['repeats']} ({_machine(rec)}).",
        "",
        *_table(["candidate", "ms/step"], ([n, f"{1e3 * t:.1f}"] for n, t in med.items())),
        "",
        *_table(["ratio", "measured"], ([k, f"{v:.2f}"] for k, v in rec["ratios"].items())),
    ]
    _bar(IMG / "optimizer_speed.png", list(med), [1e3 * t for t in med.values()], "Optimizer step", "ms")
    return lines + [
        "",
        "Target: RiemannianAdamW <= 1.5x torch AdamW (foreach). `riemix_radamw` runs its elementwise update in "
        "torch's fused AdamW kernel (its default); `riemix_radamw_foreach` is the same optimizer with "
        "`fused=False`, and `torch_adamw_fused` is torch's own fused AdamW, so the preconditioning cost on its own "
        "is riemix_radamw − torch_adamw_fused.",
        "",
        "![optimizer speed](img/optimizer_speed.png)",
        "",
    ]


def e2e_section(rec: dict) -> list[str]:
    tps, mem = rec["tokens_per_s"], rec.get("memory", {})
    lines = [
        "## End-to-end training throughput (SmolLM2-135M)",
        "",
        f"`benchmarks/e2e_throughput.py`: ARC-Easy cloze batches of {rec['args']['batch_size']}, "
        f"{rec['args']['steps']} interleaved timed steps per candidate ({_machine(rec)}).",
        "",
    ]
    rows = []
    for n, v in tps.items():
        m = mem.get(n, {}).get("peak_rss_growth_mib")
        rows.append([n, f"{v:.0f}", f"{v / tps['peft_lora_r16']:.2f}", "" if m is None else f"{m:.0f}"])
    lines += _table(["candidate", "tokens/s", "vs PEFT LoRA r=16", "peak RSS growth (MiB)"], rows)
    lines += [
        "",
        f"MixLoRA: {rec['mixlora']}",
        "",
        "Target: riemix 20/10/4 >= 0.85x PEFT LoRA r=16 tokens/s.",
        "",
    ]
    _bar(IMG / "e2e_throughput.png", list(tps), list(tps.values()), "Training throughput", "tokens/s")
    return lines + ["![throughput](img/e2e_throughput.png)", ""]


def _lrs(lrs: dict[str, float]) -> str:
    return ", ".join(f"{fam} {lr:g}" for fam, lr in lrs.items())


def default_job_section(rec: dict) -> list[str]:
    res = rec["results"]
    lines = [
        "## The default job against PEFT LoRA (SST-2 dev, 872 sentences)",
        "",
        f"`benchmarks/default_job_vs_peft.py`: SmolLM2-135M-Instruct, {rec['steps']} steps of batch 16, "
        f"same batches, prompt and evaluation ({_machine(rec)}).",
        "",
        *_table(
            ["candidate", "dev accuracy", "train seconds"],
            ([name, f"{r['accuracy']:.4f}", f"{r['train_seconds']:.0f}"] for name, r in res.items()),
        ),
    ]
    if "riemix_default_job" in res:
        r = res["riemix_default_job"]
        lines += [
            "",
            f"Zero-shot accuracy {r['zero_shot_accuracy']:.4f}; whole default job (load, zero-shot eval, "
            f"training, final eval, checkpoint) {r['wall_seconds']:.0f} s.",
        ]
    return lines + [""]


def tune_section(rec: dict) -> list[str]:
    lines = [
        "## Learning rate of the default job",
        "",
        "`benchmarks/tune_default_job.py`: trained on 90% of the packaged SST-2 train subset, scored on 400 "
        "held-out *train* sentences (never on dev).",
        "",
        *_table(
            ["lr", "held-out accuracy", "train seconds"],
            ([f"{r['lr']:.0e}", f"{r['heldout_accuracy']:.4f}", f"{r['train_seconds']:.0f}"] for r in rec["runs"]),
            left=0,
        ),
    ]
    return lines + [""]


#: (treatment, control) pairs whose differences the quality tables report
QUALITY_PAIRS = [
    ("rsgd", "sgd"),
    ("grsgd_p0.5", "rsgd"),
    ("grsgd_p0", "rsgd"),
    ("grsgd_p0", "grsgd_p0.5"),
    ("grsgd_p0.5_ownlr", "rsgd"),
    ("grsgd_p0_ownlr", "rsgd"),
    ("radamw", "adamw"),
    ("gradamw_p0.5", "radamw"),
    ("gradamw_p0", "radamw"),
    ("gradamw_p0", "gradamw_p0.5"),
    ("gradamw_p0.5", "peft_adamw"),
]


#: metrics that are correlations (their noise is a correlation's standard error, not a binomial one)
CORRELATION_METRICS = ("matthews_corr", "pearson", "spearman", "pearson_spearman")


def _difference(a: dict, b: dict, n: int, metric: str = "accuracy") -> tuple[float, float, bool] | None:
    """Mean final difference a - b over shared seeds, its noise scale, and whether it is within noise.

    Noise is the larger of the seed-to-seed std of the paired difference and the sampling standard error of
    a difference of two scores on ``n`` examples: binomial, sqrt(2 p (1 - p) / n), for accuracy-like metrics;
    sqrt(2) (1 - r^2) / sqrt(n - 1) for correlations (``CORRELATION_METRICS``). "Within noise" means
    |diff| < 2 noise.
    """
    pairs = [
        (x, y)
        for sx, x in zip(a["seeds"], a["final_all"], strict=False)
        for sy, y in zip(b["seeds"], b["final_all"], strict=False)
        if sx == sy
    ]
    if not pairs:
        return None
    diffs = [x - y for x, y in pairs]
    mean = sum(diffs) / len(diffs)
    p = min(max((a["final"] + b["final"]) / 2, -1.0), 1.0)
    if metric in CORRELATION_METRICS:
        sampling = math.sqrt(2) * (1 - p * p) / math.sqrt(n - 1)
    else:
        p = max(p, 0.0)
        sampling = (2 * p * (1 - p) / n) ** 0.5
    seed_sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5 if len(diffs) > 1 else 0.0
    noise = max(sampling, seed_sd)
    return mean, noise, abs(mean) < 2 * noise


def mcnemar_p(hits_a: str, hits_b: str) -> float:
    """Exact two-sided McNemar p-value of two classifiers' per-example correctness on the same examples.

    Args:
        hits_a: ``"1"``/``"0"`` per example for the first classifier.
        hits_b: the same for the second, in the same order.

    Returns:
        ``P(|discordant split| at least as uneven as observed)`` under a fair coin; 1.0 with no discordance.
    """
    if len(hits_a) != len(hits_b):
        raise ValueError(f"hits differ in length: {len(hits_a)} vs {len(hits_b)}")
    only_a = sum(x == "1" and y == "0" for x, y in zip(hits_a, hits_b, strict=True))
    only_b = sum(x == "0" and y == "1" for x, y in zip(hits_a, hits_b, strict=True))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _paired_p(rec: dict, a: str, b: str) -> list[float]:
    """McNemar p per shared seed of the final runs of candidates ``a`` and ``b`` at their reported lr."""
    summ = rec["summary"]

    def hits(cand: str) -> dict[int, str]:
        return {
            r["seed"]: r["final_hits"]
            for r in rec["runs"]
            if r["stage"] == "final" and r["candidate"] == cand and r["lr"] == summ[cand]["lr"] and "final_hits" in r
        }

    ha, hb = hits(a), hits(b)
    return [mcnemar_p(ha[s], hb[s]) for s in sorted(ha.keys() & hb.keys())]


#: (gated, its p=1 base with the same optimizer) pairs counted in the cross-task summary
GATED_PAIRS = [
    (gated, base)
    for gated, (_, opt, power) in CANDIDATES.items()
    if power < 1
    for base, (fam, base_opt, base_power) in CANDIDATES.items()
    if base_opt == opt and base_power == 1 and fam == base
]


def _pair_difference(rec: dict, a: str, b: str) -> tuple[float, float, bool] | None:
    """``_difference`` of candidates ``a`` and ``b`` in ``rec``, or None when either has no final scores."""
    summ = rec.get("summary", {})
    if a not in summ or b not in summ or "final_all" not in summ[a] or "final_all" not in summ[b]:
        return None
    return _difference(summ[a], summ[b], rec["args"]["eval_subset"], rec.get("metric", "accuracy"))


def _quality_title(name: str, rec: dict, short: bool = False) -> str:
    """``task (formulation), model, N steps``, plus what the file name adds to the default one (a variant).

    ``quality_compare`` names its file ``quality_<model>_<task>_<formulation>.json``; a run written with
    ``--out`` under a longer name (``..._rsgd_lr1e-3.json``) is a variant of that protocol, and its title
    says so (a ``_<N>steps`` suffix is already in the title). ``short`` keeps the formulation's code name.
    """
    a, code = rec["args"], rec.get("formulation", rec["args"]["format"])
    form = code if short else {"head": "classification head", "labelwords": "label words"}.get(code, code)
    title = f"{a['task']} ({form}), {a['model']}, {a['steps']} steps"
    variant = name.removesuffix(".json").removeprefix(result_stem(a["model"], a["task"], code)).strip("_")
    return title + (f", {variant.replace('_', ' ')}" if variant and variant != f"{a['steps']}steps" else "")


def quality_overview(records: dict[str, dict]) -> list[str]:
    """One row per task: each candidate's end score (mean over seeds), and how often gating helped.

    Args:
        records: results file name -> its quality_compare record.
    """
    order = ["zero_shot", *CANDIDATES]
    present = [c for c in order if any(c in rec.get("summary", {}) for rec in records.values())]
    lines = [
        "| task (formulation), model, steps | majority | " + " | ".join(present) + " |",
        "|---|---:|" + "---:|" * len(present),
    ]
    tally = {"better": [], "worse": [], "tie": []}
    for name, rec in records.items():
        summ = rec.get("summary", {})
        task = _quality_title(name, rec, short=True)
        cells = []
        for c in present:
            e = summ.get(c)
            cells.append("-" if e is None or "final" not in e else f"{100 * e['final']:.1f}")
        major = rec.get("majority_baseline")
        lines.append(f"| {task} | {'-' if major is None else f'{100 * major:.1f}'} | " + " | ".join(cells) + " |")
        for g, b in GATED_PAIRS:
            d = _pair_difference(rec, g, b)
            if d is not None:
                verdict = "tie" if d[0] == 0 else ("better" if d[0] > 0 else "worse")
                other_lr = summ[g].get("lr") != summ[b].get("lr")  # an _ownlr candidate: lr and gate differ
                tally[verdict].append((f"{task}: {g}" + (" (at another lr than its base)" if other_lr else ""), d[2]))

    def count(kind: str) -> str:
        beyond = [name for name, within in tally[kind] if not within]
        return f"{len(tally[kind])} {kind} ({len(beyond)} beyond noise{': ' + ', '.join(beyond) if beyond else ''})"

    return [
        "### Overview: end score per task (%, mean over seeds; task's primary metric)",
        "",
        *lines,
        "",
        "Gate-rescaled candidate vs its p=1 base (same optimizer and task): "
        f"{count('better')}, {count('worse')}, {len(tally['tie'])} exactly equal.",
        "",
    ]


def _lr_source(rec: dict, records: dict[str, dict]) -> str:
    """Where ``rec``'s fixed learning rates come from, in words.

    The sweep of another task on the same model that chose every one of them, or "set by hand" when none did.
    """
    fixed, a = rec["args"]["lr"], rec["args"]
    for other in records.values():
        b = other["args"]
        chosen = other.get("chosen_lr", {})
        if (
            other is not rec
            and sweep_runs(other)
            and b["model"] == a["model"]
            and all(chosen.get(f) == v for f, v in fixed.items())
        ):
            return f"chosen by the {b['task']} sweep, {b['steps']}-step protocol"
    return "set by hand, not chosen by a sweep"


def quality_section(name: str, rec: dict, others: dict[str, dict] | None = None) -> list[str]:
    """One task's tables, sweep and plot; ``others`` (all records) names where fixed learning rates came from."""
    a, summ = rec["args"], rec.get("summary", {})
    title = _quality_title(name, rec)
    sweep = sweep_runs(rec)
    lines = [
        f"### {title}",
        "",
        f"`benchmarks/quality_compare.py --task {a['task']} --model {a['model']}` ({_machine(rec)}): "
        f"{a['steps']} steps x batch {a['batch_size']}"
        + (f", sequences cut to {a['max_length']} tokens" if a.get("max_length") else "")
        + ", linear decay, same batches for every candidate; "
        f"scores on a fixed {a['eval_subset']}-example subset of the reported split after {a['early_step']} steps "
        "and at the end; mean ± std over seeds. "
        + (
            f"Learning rates were swept on a held-out 10% of train ({a['sweep_steps']} steps, "
            f"{a['sweep_subset']} held-out examples); the gated variants use their family's choice, except "
            "`_ownlr` ones, which had a sweep of their own."
            if sweep
            else "No learning-rate sweep on this task; the gated variants use their family's learning rate."
        )
        + (f" Fixed learning rates: {_lrs(a['lr'])} ({_lr_source(rec, others or {})})." if a.get("lr") else ""),
        "",
        f"| candidate | lr | @{a['early_step']} steps | end | trainable params | seeds |",
        "|---|---:|---:|---:|---:|---|",
    ]
    if rec.get("majority_baseline") is not None:
        lines.append(f"| majority class (reference) | - | - | {100 * rec['majority_baseline']:.2f} | 0 | - |")
    for cand, e in summ.items():
        lr = "-" if cand == "zero_shot" else f"{e['lr']:.0e}"
        params = e.get("trainable_params") or 0
        lines.append(
            f"| {cand} | {lr} | {pct(e, 'early')} | {pct(e, 'final')} | {params:,} | "
            f"{', '.join(map(str, e['seeds']))} |"
        )
    diffs = []
    for t, c in QUALITY_PAIRS:
        d = _pair_difference(rec, t, c)
        if d is not None:
            ps = ", ".join(f"{p:.2g}" for p in _paired_p(rec, t, c)) or "-"
            diffs.append(
                f"| {t} − {c} | {100 * d[0]:+.2f} | {100 * d[1]:.2f} | "
                f"{'within noise' if d[2] else 'beyond noise'} | {ps} |"
            )
    if diffs:
        lines += [
            "",
            "| difference (end, points) | mean | noise (1 sd) | verdict (2 sd) | paired McNemar p per seed |",
            "|---|---:|---:|---|---:|",
            *diffs,
        ]
    if sweep:
        lines += [
            "",
            "<details><summary>learning-rate sweep (held-out train)</summary>",
            "",
            "| family | lr | held-out score |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r['candidate']} | {r['lr']:.0e} | {100 * r['final']:.2f} |" for r in sweep]
        chosen = []
        for fam, lr in rec.get("chosen_lr", {}).items():
            runs = [r for r in sweep if r["candidate"] == fam]
            grid, scores = [r["lr"] for r in runs], {r["final"] for r in runs}
            if len(grid) > 1 and len(scores) == 1:  # nothing to choose between: the tie-break picked it
                chosen.append(f"{fam} {lr:g} (every grid point tied, so the smallest was taken)")
                continue
            edge = len(grid) > 1 and lr in (min(grid), max(grid))
            chosen.append(f"{fam} {lr:g}" + (" (at the edge of its grid)" if edge else ""))
        lines += [
            "",
            f"Chosen: {', '.join(chosen)}.",
            "",
            "</details>",
        ]
    trained = {c: e for c, e in summ.items() if "final" in e}
    if trained:
        img = f"{name.removesuffix('.json')}.png"
        _bar(IMG / img, list(trained), [100 * e["final"] for e in trained.values()], title, "score at end (%)")
        lines += ["", f"![{title}](img/{img})"]
    return lines + [""]


def main() -> None:
    script_parser(__doc__).parse_args()  # no options; ``--help`` prints the docstring
    out = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`.",
        "All timings are medians of interleaved runs on a shared, noisy 2-core CPU machine; compare ratios "
        "within one run, not absolute numbers across runs.",
        "",
    ]
    sections = [
        ("default_job_vs_peft.json", default_job_section),
        ("tune_default_job.json", tune_section),
        ("layer_speed_float32.json", layer_section),
        ("layer_sweep.json", layer_sweep_section),
        ("optimizer_speed.json", optimizer_section),
        ("e2e_throughput.json", e2e_section),
    ]
    for name, fn in sections:
        rec = _load(name)
        if rec is not None:
            out += fn(rec)
    quality = sorted(
        (p.name for p in RESULTS.glob("quality_*.json") if not p.name.endswith("_quick.json")),
        key=lambda n: ("smollm2" not in n, "commonsense_qa" not in n, n),  # the headline table first
    )
    if quality:
        out += [
            "## Quality: the paper's optimizer comparisons at small scale",
            "",
            "A difference is flagged *within noise* when it is smaller than twice the larger of the seed-to-seed "
            "std of the paired difference and the sampling standard error of a difference of two scores on "
            "the evaluated subset (binomial for accuracy and F1, a correlation's for MCC and Pearson/Spearman). "
            "Classification tables show the majority-class score as a reference: a candidate at that score "
            "predicts one class and has learned nothing usable. Runs that stored per-example correctness also "
            "get an exact paired McNemar test per seed on the same examples (p < 0.05: the two candidates' "
            "right answers differ beyond chance on that seed); it tests accuracy even where the task's primary "
            "metric is another one.",
            "",
        ]
        records = {name: _load(name) for name in quality}
        out += quality_overview(records)
        for name, rec in records.items():
            out += quality_section(name, rec, records)
    out += [
        "## Expert-collapse evidence",
        "",
        "See [diagnostics.md](diagnostics.md) "
        "(`benchmarks/balance_evidence.py`, `benchmarks/results/balance_evidence.json`).",
        "",
    ]
    atomic_write_text(DOC, "\n".join(out) + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
