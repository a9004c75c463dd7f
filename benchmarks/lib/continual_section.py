"""The report's continual-learning section: one table per ``benchmarks/results/continual_<stream>.json``
(``benchmarks/continual.py``), the targets of issue 14 checked, and accuracy-matrix heatmaps."""

from __future__ import annotations

from lib.harness import RESULTS
from lib.render import IMG, load, machine, table
from riemix.continual.plots import accuracy_heatmap

__all__ = ["continual_sections", "novelty_margin_section"]

_PLOTTED = ("peft_seq", "riemix_dynamic", "riemix_dynamic_replay", "riemix_skill_routed", "riemix_dynamic_calibrated")


def _f(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _targets(c: dict) -> list[str]:
    lines = []
    dyn, seq = c.get("riemix_dynamic"), c.get("peft_seq")
    if dyn and seq:
        gain = 100 * (dyn["avg"] - seq["avg"])
        ratio = abs(dyn["bwt"]) / abs(seq["bwt"]) if seq["bwt"] else float("inf")
        lines.append(
            f"- `riemix_dynamic` − `peft_seq`: Avg {gain:+.1f} points (target ≥ +5: "
            f"{'met' if gain >= 5 else 'not met'}); |BWT| {100 * abs(dyn['bwt']):.1f} vs {100 * abs(seq['bwt']):.1f}, "
            f"ratio {ratio:.2f} (target ≤ 0.5: {'met' if ratio <= 0.5 else 'not met'})."
        )
    for name in ("riemix_skill_routed", "riemix_dynamic_calibrated"):
        other = c.get(name)
        if other and seq:
            gain = 100 * (other["avg"] - seq["avg"])
            ratio = abs(other["bwt"]) / abs(seq["bwt"]) if seq["bwt"] else float("inf")
            lines.append(f"- `{name}` − `peft_seq`: Avg {gain:+.1f} points; |BWT| ratio {ratio:.2f}.")
    rep, seq_rep = c.get("riemix_dynamic_replay"), c.get("peft_seq_replay")
    if rep and seq_rep:
        gain = 100 * (rep["avg"] - seq_rep["avg"])
        lines.append(
            f"- `riemix_dynamic_replay` − `peft_seq_replay`: Avg {gain:+.1f} points (target > 0: "
            f"{'met' if gain > 0 else 'not met'})."
        )
    return lines


def _heatmaps(stem: str, rec: dict) -> list[str]:
    lines = []
    stream = rec["stream"]
    for name in _PLOTTED:
        cand = rec["candidates"].get(name)
        if not cand:
            continue
        rows = [next(iter(cand["per_seed"].values()))["zero_shot"], *cand["matrix"]]
        labels = ["untrained"] + [f"after {t}" for t in stream]
        path = IMG / f"{stem}_{name}.png"
        accuracy_heatmap(rows, labels, stream, f"{name}: accuracy R[k][i] (mean over seeds)", "evaluated task", path)
        lines.append(f"![{name}](img/{path.name})")
    return lines


def section(stem: str, rec: dict) -> list[str]:
    args, stream, cands = rec["args"], rec["stream"], rec.get("candidates", {})
    lines = [
        f"### Stream {' → '.join(stream)}",
        "",
        f"`benchmarks/continual.py` ({machine(rec)}): SmolLM2-135M-Instruct, {args['steps']} steps of batch "
        f"{args['batch_size']} per task on a {args['train_subset']}-example subset of each train split, "
        f"{args['max_length']}-token prompts, {args['eval_subset']} test examples per task, riemix experts of "
        f"rank {args['rank']}, replay {args['replay']} exemplars per task. Learning rates chosen on the first "
        "task's held-out train examples: "
        + ", ".join(f"{k} → {v:.2f}" for k, v in rec.get("lr_selection", {}).items())
        + f" (chosen: {', '.join(f'{k} {v:g}' for k, v in rec.get('lr', {}).items())}). Accuracy in %.",
        "",
        *table(
            ["candidate", "Avg", "avg incremental", "BWT", "FWT", "trainable params", "seconds", "seeds"],
            (
                [
                    name,
                    _f(c["avg"]),
                    _f(c["avg_incremental"]),
                    _f(c["bwt"], True),
                    _f(c["fwt"], True),
                    f"{int(c['trainable_params']):,}",
                    f"{c['seconds']:.0f}",
                    ", ".join(map(str, c["seeds"])),
                ]
                for name, c in cands.items()
            ),
        ),  # fmt: skip
        "",
        *_targets(cands),
    ]
    detected = [
        (cand, seed, run)
        for cand in ("riemix_dynamic", "riemix_dynamic_calibrated")
        for seed, run in rec.get("raw", {}).get(cand, {}).items()
    ]
    for name, seed, run in detected:
        decisions = "; ".join(
            f"{d['task']} {d['reason']} ({', '.join(f'{s:.3f}' for s in d['similarities']) or '–'} vs "
            f"{d['threshold']:.3f})"
            for d in run["decisions"]
        )
        lines.append(
            f"- {name} seed {seed}: experts per layer after each task {run['experts']}; detector: "
            f"{decisions}; growth {', '.join(f'{1e3 * s:.0f} ms' for s in run['growth_seconds'])}."
        )
    lines += ["", *_heatmaps(stem, rec), ""]
    return lines


def novelty_margin_section(rec: dict) -> list[str]:
    """``benchmarks/novelty_margin.py``: what the detector's threshold has to separate, per sample size."""
    taus = rec["thresholds_k1_k3_k7"]
    by_n = rec["by_samples"]
    rows = []
    for n, m in by_n.items():
        errs = [m["errors"][f"{t:.4f}"] for t in taus]
        rows.append(
            [n, f"{m['within_min']:.4f}", f"{m['between_max']:.4f}"]
            + [f"{e['same_task_called_novel']} / {e['other_task_called_known']}" for e in errs]
        )
    n0 = "64" if "64" in by_n else next(iter(by_n))
    between = by_n[n0]["between"]
    from novelty_margin import SAME_SKILL  # results written before the JSON recorded it

    same = {frozenset(p) for p in rec.get("same_skill", SAME_SKILL)}
    closest = sorted(
        ((k, v) for k, v in between.items() if frozenset(k.split("|")) not in same), key=lambda kv: -kv[1]["mean"]
    )[:4]
    draws, comps = rec["args"]["draws"], next(iter(by_n.values()))["errors"][f"{taus[0]:.4f}"]["comparisons"]
    return [
        "### Novelty detector: what its threshold separates",
        "",
        f"`benchmarks/novelty_margin.py` ({machine(rec)}): SmolLM2-135M base embeddings of {rec['args']['pool']} "
        f"train texts per task ({len(rec['args']['tasks'].split(','))} tasks), {draws} random draws per sample "
        "size n; *within*: two disjoint samples of one task, *between*: samples of two different tasks (pairs "
        "that are one skill, such as amazon and yelp, are not counted). Errors: same task called novel / "
        f"other task called known, out of {comps[0]} / {comps[1]} comparisons, at the default thresholds "
        f"τ₁, τ₃, τ₇ = {', '.join(f'{t:.4f}' for t in taus)}.",
        "",
        *table(
            ["n", "within-task min", "between-task max"] + [f"errors at {t:.4f}" for t in taus],
            rows,
        ),
        "",
        f"Closest different tasks at n={n0} (mean ± sd cosine): "
        + "; ".join(f"{k.replace('|', '–')} {v['mean']:.4f} ± {v['sd']:.4f}" for k, v in closest)
        + ".",
        "",
    ]


def continual_sections() -> list[str]:
    """The section's lines (none when no result exists)."""
    names = sorted(p.name for p in RESULTS.glob("continual_*.json") if not p.name.endswith("_quick.json"))
    if not names:
        return []
    out = [
        "## Continual learning",
        "",
        "Tasks arrive one after another; after each, every task seen so far and the next one are scored "
        "(the accuracy matrix R). Avg: mean accuracy after the last task; BWT: mean change of each earlier "
        "task from just after it to the end (negative = forgetting); FWT: gain on the next task before "
        "training it over the untrained model. See [continual.md](continual.md). Candidates: `peft_seq` "
        "(PEFT LoRA, rank matched in trainable parameters, trained task after task), `peft_seq_replay` (+ the "
        "same replay), `riemix_static` (fixed experts, all trained on every task), `riemix_dynamic` (detector, "
        "growth, maturity, the other skills' experts frozen), `riemix_dynamic_replay`, `multitask` (PEFT LoRA "
        "on all tasks jointly: the upper reference), `riemix_skill_routed` (`riemix_dynamic` with skill routing: "
        "each example goes to the experts of its skill, at evaluation the skill whose detector centroid is "
        "nearest to the example), `riemix_dynamic_calibrated` (`riemix_dynamic` with the novelty threshold τ₀ "
        "read off the detector margin below, measured on train texts).",
        "",
    ]
    for name in names:
        out += section(name.removesuffix(".json"), load(name))
    margin = load("novelty_margin.json")
    if margin:
        out += novelty_margin_section(margin)
    mixed = load("layer_speed_mixed_rank_float32.json")
    if mixed:
        r = mixed["ratios"]
        out += [
            "### Mixed-rank layer",
            "",
            f"`benchmarks/layer_speed.py` ({machine(mixed)}), {mixed['args']['width']}², {mixed['args']['tokens']} "
            f"tokens, E={mixed['args']['experts']}, top-{mixed['args']['top_k']}: experts of ranks r/2, r, 3r/2 in "
            f"turn (r={mixed['args']['rank']}) take {r['riemix_mixed_rank_over_base']:.2f}× the frozen base, "
            f"uniform rank {r['riemix_over_base']:.2f}× in the same run. A layer stores every expert at its largest "
            "rank (the padding stays zero), so mixed ranks cost what uniform experts of the largest rank cost "
            f"(here {3 * mixed['args']['rank'] // 2} against {mixed['args']['rank']}).",
            "",
        ]
    return out
