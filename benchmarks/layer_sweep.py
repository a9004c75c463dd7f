"""Layer speed across sizes and dtypes: one factor at a time around a base point, plus bf16.

Each point runs ``layer_speed.measure`` (frozen base, riemix, per-expert loop, PEFT LoRA of rank E·r; fwd+bwd,
interleaved repeats, medians) and records the ratios riemix/base, loop/riemix and riemix/PEFT. The base
point is smaller than ``layer_speed.py``'s default so the whole sweep, bf16 included, fits in a few minutes
on 2 CPU cores. Prints a table and writes ``benchmarks/results/layer_sweep.json``.

``--experts-sweep`` instead times the frozen base, the dense path and the sparse path (``expert_compute``
forced; ``layer_speed.PATHS``) for E ∈ {8, 16, 32, 64, 128} at top-2, r=8 on 2048x2048 with 2048 tokens
(fp32 on CPU unless ``--dtype``/``--device`` say otherwise): how each path's time grows with E.
Writes ``benchmarks/results/layer_sweep_experts.json`` (``--out`` to override).

    python benchmarks/layer_sweep.py            # E, top-k, r and width sweeps in fp32, base point in bf16
    python benchmarks/layer_sweep.py --quick    # two tiny points
    python benchmarks/layer_sweep.py --experts-sweep --repeats 5
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from layer_speed import PATHS, measure, ratios_of
from lib.harness import record_header, script_parser, write_record
from lib.stats import medians

BASE = {"experts": 8, "top_k": 2, "rank": 4, "width": 1024, "tokens": 1024}
SWEEP = {"experts": [4, 8, 16, 32], "top_k": [1, 2, 4, 8], "rank": [2, 4, 8, 16], "width": [512, 1024, 2048]}
#: ``--experts-sweep``: the sizes held fixed and the expert counts.
EXPERTS_POINT = {"top_k": 2, "rank": 8, "width": 2048, "tokens": 2048}
EXPERTS = [8, 16, 32, 64, 128]


def points(quick: bool) -> list[tuple[str, dict, str]]:
    """(varied factor, sizes, dtype) of every point; the base point appears once per dtype."""
    if quick:
        small = {**BASE, "width": 128, "tokens": 128}
        return [("base", small, "float32"), ("base", small, "bfloat16")]
    out, seen = [], set()
    for factor, values in SWEEP.items():
        for v in values:
            sizes = {**BASE, factor: v}
            key = tuple(sizes.values())
            if sizes["top_k"] <= sizes["experts"] and key not in seen:
                seen.add(key)
                out.append(("base" if sizes == BASE else factor, sizes, "float32"))
    out.append(("base", dict(BASE), "bfloat16"))
    out.append(("width", {**BASE, "width": 512}, "bfloat16"))
    return out


def experts_sweep(
    repeats: int, quick: bool, device: str = "cpu", dtype: str = "float32", out: str | None = None
) -> None:
    """Base, dense and sparse path fwd+bwd times for each E at top-2, r=8; print and write JSON."""
    point = {**EXPERTS_POINT, "width": 128, "tokens": 128} if quick else dict(EXPERTS_POINT)
    print(f"{'E':>4} {'base ms':>8} {'dense ms':>9} {'sparse ms':>10} {'dense/base':>10} {'sparse/base':>11}")
    rows = []
    for experts in EXPERTS[:2] if quick else EXPERTS:
        sizes = {"experts": experts, **point}
        args = SimpleNamespace(**sizes, repeats=3 if quick else repeats, sparse_case=True, device=device)
        med = medians(measure(args, getattr(torch, dtype)))
        assert list(med) == list(PATHS)
        rows.append({**sizes, "dtype": dtype, "median_seconds": med, **ratios_of(med)})
        ms = [1e3 * med[name] for name in PATHS]
        print(
            f"{experts:4d} {ms[0]:8.1f} {ms[1]:9.1f} {ms[2]:10.1f} "
            f"{rows[-1]['riemix_dense_over_base']:10.2f} {rows[-1]['riemix_sparse_over_base']:11.2f}",
            flush=True,
        )
    record = {**record_header("layer_sweep_experts"), "fixed": point, "repeats": repeats, "points": rows}
    if device == "cuda":
        record["device"] = torch.cuda.get_device_name()
    write_record(record, "layer_sweep_experts", quick, out)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--experts-sweep", action="store_true", help="base vs dense vs sparse path across E")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="--experts-sweep only")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="--experts-sweep only")
    parser.add_argument("--out", default=None, help="--experts-sweep only: JSON output path")
    args = parser.parse_args()
    if args.experts_sweep:
        experts_sweep(args.repeats, args.quick, args.device, args.dtype, args.out)
        return
    rows = []
    header = f"{'varied':<8} {'E':>3} {'k':>3} {'r':>3} {'width':>6} {'dtype':<9} {'base ms':>8} " + (
        f"{'riemix/base':>11} {'loop/riemix':>11} {'riemix/peft':>11}"
    )
    print(header)
    for factor, sizes, dtype in points(args.quick):
        times = measure(SimpleNamespace(**sizes, repeats=3 if args.quick else args.repeats), getattr(torch, dtype))
        med = medians(times)
        ratios = ratios_of(med)
        row = {
            "varied": factor,
            **sizes,
            "dtype": dtype,
            "median_seconds": med,
            **ratios,
            "riemix_over_peft_lora": ratios.get("riemix_over_peft_lora"),  # None when PEFT is not installed
        }
        rows.append(row)
        peft = row["riemix_over_peft_lora"]
        print(
            f"{factor:<8} {sizes['experts']:3d} {sizes['top_k']:3d} {sizes['rank']:3d} {sizes['width']:6d} "
            f"{dtype:<9} {1e3 * med['base']:8.2f} {row['riemix_over_base']:11.2f} {row['loop_over_riemix']:11.2f} "
            f"{'-' if peft is None else f'{peft:.2f}':>11}",
            flush=True,
        )
    record = {**record_header("layer_sweep"), "base_point": BASE, "repeats": args.repeats, "points": rows}
    write_record(record, "layer_sweep", args.quick)


if __name__ == "__main__":
    main()
