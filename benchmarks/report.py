"""Render ``docs/benchmarks.md`` (tables) and ``docs/img/*.png`` (plots) from ``benchmarks/results/*.json``.

Every number in the document comes from a committed JSON file, so the docs can be checked against them.

    python benchmarks/report.py
"""

from __future__ import annotations

import math

from lib.continual_section import continual_sections
from lib.harness import RESULTS, script_parser
from lib.render import DOC, IMG, bar, load, machine, table
from lib.speed_sections import speed_sections
from lib.stats import pct
from quality_compare import CANDIDATES, result_stem, sweep_runs

from riemix.io.fileio import atomic_write_text


def _lrs(lrs: dict[str, float]) -> str:
    return ", ".join(f"{fam} {lr:g}" for fam, lr in lrs.items())


def default_job_section(rec: dict) -> list[str]:
    res = rec["results"]
    lines = [
        "## The default job against PEFT LoRA (SST-2 dev, 872 sentences)",
        "",
        f"`benchmarks/default_job_vs_peft.py`: SmolLM2-135M-Instruct, {rec['steps']} steps of batch 16, "
        f"same batches, prompt and evaluation ({machine(rec)}).",
        "",
        *table(
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
        *table(
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
        f"`benchmarks/quality_compare.py --task {a['task']} --model {a['model']}` ({machine(rec)}): "
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
        bar(IMG / img, list(trained), [100 * e["final"] for e in trained.values()], title, "score at end (%)")
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
    ]
    for name, fn in sections:
        rec = load(name)
        if rec is not None:
            out += fn(rec)
    out += speed_sections()
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
        records = {name: load(name) for name in quality}
        out += quality_overview(records)
        for name, rec in records.items():
            out += quality_section(name, rec, records)
    out += continual_sections()
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
