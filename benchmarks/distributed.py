"""Data parallel and FSDP2 on the CPU: throughput and peak memory per process on SmolLM2-135M.

Each configuration is one ``riemix train`` run (SST-2 label words, packaged data, a global batch of 8 per
step, ``--max-steps`` steps, no zero-shot evaluation, a 32-example final evaluation) on the same machine:

- ``1proc_2threads``: one process using both cores;
- ``ddp_2x1thread``: ``torchrun --nproc_per_node 2``, one thread each, DDP over the replicated model;
- ``fsdp_2x1thread``: the same with ``--fsdp``: the frozen base sharded by FSDP2, adapters replicated.

Tokens/s (non-padding training tokens of all processes per second of training steps) and each process's
peak and final resident memory come from the run's ``summary.json`` (the peak includes loading the whole
model, which every process does before FSDP2 shards it; the final RSS shows what sharding keeps). The
configurations run one after the other.

    python benchmarks/distributed.py                 # 12 steps each
    python benchmarks/distributed.py --quick         # 3 steps each (smoke run)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from lib.harness import record_header, script_parser, write_record

CONFIGS = {
    "1proc_2threads": (1, 2, []),
    "ddp_2x1thread": (2, 1, []),
    "fsdp_2x1thread": (2, 1, ["--fsdp"]),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, steps: int, workdir: Path) -> dict:
    """One configuration's ``summary.json`` (after a run in ``workdir/name``)."""
    procs, threads, extra = CONFIGS[name]
    argv = ["train", "--max-steps", str(steps), "--batch-size", str(8 // procs), "--no-eval-before",
            "--eval-subset", "32", "--no-progress", "--no-verbose", "--output-dir", str(workdir / name),
            *extra]  # fmt: skip
    head = [sys.executable, "-m", "riemix"]
    if procs > 1:
        head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master-port={_port()}",
                "-m", "riemix"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*head, *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads((workdir / name / "summary.json").read_text())


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--steps", type=int, default=12, help="training steps per configuration")
    parser.add_argument("--quick", action="store_true", help="3 steps each (smoke run)")
    parser.add_argument("--out", help="result JSON path (default: results/distributed[_quick].json)")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    rows = {}
    with tempfile.TemporaryDirectory(prefix="riemix-dist-") as tmp:
        for name in CONFIGS:
            summary = run(name, steps, Path(tmp))
            rows[name] = {
                "tokens_per_s": summary["tokens_per_s"],
                "train_seconds": summary["train_seconds"],
                "rss_mib_per_process": summary["rss_mib_per_process"],
                "after": summary["after"],
            }
    base = rows["1proc_2threads"]["tokens_per_s"]
    print(f"{'configuration':<16} {'tokens/s':>9} {'vs 1 proc':>9}  {'peak RSS (MiB)':<16} RSS at the end (MiB)")
    for name, row in rows.items():
        peak = ", ".join(f"{x:.0f}" for x in row["rss_mib_per_process"]["peak"])
        now = ", ".join(f"{x:.0f}" for x in row["rss_mib_per_process"]["now"])
        print(f"{name:<16} {row['tokens_per_s']:9.0f} {row['tokens_per_s'] / base:9.2f}  {peak:<16} {now}")
    record = {**record_header("distributed"), "args": vars(args), "steps": steps, "rows": rows}
    write_record(record, "distributed", args.quick, args.out)


if __name__ == "__main__":
    main()
