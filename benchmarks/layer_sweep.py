"""Layer speed across sizes and dtypes: one factor at a time around a base point, plus bf16.

Each point runs ``layer_speed.measure`` (frozen base, riemix, per-expert loop, PEFT LoRA of rank E·r; fwd+bwd,
interleaved repeats, medians) and records the ratios riemix/base, loop/riemix and riemix/PEFT. The base
point is smaller than ``layer_speed.py``'s default so the whole sweep, bf16 included, fits in a few minutes
on 2 CPU cores. Prints a table and writes ``benchmarks/results/layer_sweep.json``.

    python benchmarks/layer_sweep.py            # E, top-k, r and width sweeps in fp32, base point in bf16
    python benchmarks/layer_sweep.py --quick    # two tiny points
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from layer_speed import measure, ratios_of
from lib.harness import record_header, script_parser, write_record
from lib.stats import medians

BASE = {"experts": 8, "top_k": 2, "rank": 4, "width": 1024, "tokens": 1024}
SWEEP = {"experts": [4, 8, 16, 32], "top_k": [1, 2, 4, 8], "rank": [2, 4, 8, 16], "width": [512, 1024, 2048]}


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


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
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
