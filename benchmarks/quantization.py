"""A quantized base against full precision on the CPU: the default job, shortened, fp32 vs NF4 (bitsandbytes).

Each configuration is one ``riemix train`` run of the default job (SmolLM2-135M, SST-2 label words, batch 16,
default adapter and optimizer) for ``--steps`` steps, evaluated on a fixed 200-example dev subset before
and after; the runs go one after the other. Accuracy, tokens/s and each process's peak resident memory
come from the run's ``summary.json``.

    python benchmarks/quantization.py            # 20 steps each
    python benchmarks/quantization.py --quick    # 2 steps, 16 evaluation examples (smoke run)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lib.harness import record_header, script_parser, write_record

CONFIGS = {"fp32": [], "nf4": ["--quantization", "nf4"]}


def run(name: str, steps: int, subset: int, workdir: Path) -> dict:
    """One configuration's ``summary.json``."""
    argv = [sys.executable, "-m", "riemix", "train", "--max-steps", str(steps), "--eval-subset", str(subset),
            "--no-progress", "--no-verbose", "--output-dir", str(workdir / name), *CONFIGS[name]]  # fmt: skip
    done = subprocess.run(argv, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads((workdir / name / "summary.json").read_text())


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--steps", type=int, default=20, help="training steps per configuration")
    parser.add_argument("--quick", action="store_true", help="2 steps, 16 evaluation examples (smoke run)")
    parser.add_argument("--out", help="result JSON path (default: results/quantization[_quick].json)")
    args = parser.parse_args()
    steps, subset = (2, 16) if args.quick else (args.steps, 200)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="riemix-quant-") as tmp:
        for name in CONFIGS:
            s = run(name, steps, subset, Path(tmp))
            rows[name] = {
                "before": s["before"],
                "after": s["after"],
                "tokens_per_s": s["tokens_per_s"],
                "train_seconds": s["train_seconds"],
                "peak_rss_mib": max(s["rss_mib_per_process"]["peak"]),
            }
    print(f"{'base':<6} {'accuracy before':>16} {'after':>7} {'tokens/s':>9} {'peak RSS (MiB)':>15}")
    for name, r in rows.items():
        print(f"{name:<6} {r['before']['accuracy']:16.4f} {r['after']['accuracy']:7.4f} {r['tokens_per_s']:9.1f} "
              f"{r['peak_rss_mib']:15.0f}")  # fmt: skip
    record = {**record_header("quantization"), "args": vars(args), "steps": steps, "eval_subset": subset, "rows": rows}
    write_record(record, "quantization", args.quick, args.out)


if __name__ == "__main__":
    main()
