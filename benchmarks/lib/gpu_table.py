"""One table of what ``benchmarks/gpu_check.sh`` wrote into its output folder.

    python benchmarks/lib/gpu_table.py OUT_DIR

Rows: each layer benchmark's candidates (median ms and ratio to the frozen base), each end-to-end
candidate (tokens/s), and each ``train_*`` run (accuracy before/after, tokens/s, peak RSS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(out: Path) -> list[tuple[str, str, str]]:
    """``(source, candidate, value)`` rows of every result in ``out``."""
    table = []
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text())
        med = data.get("median_seconds")
        if isinstance(med, dict):
            base = med.get("frozen_base") or med.get("base")
            for name, sec in med.items():
                if isinstance(sec, (int, float)):
                    ratio = f" ({sec / base:.2f}x base)" if base else ""
                    table.append((path.stem, name, f"{sec * 1e3:.3f} ms{ratio}"))
        for name, row in (data.get("candidates") or {}).items():
            if isinstance(row, dict) and "tokens_per_s" in row:
                table.append((path.stem, name, f"{row['tokens_per_s']:.0f} tok/s"))
    for summary in sorted(out.glob("train_*/summary.json")):
        s = json.loads(summary.read_text())
        before = (s.get("before") or {}).get("accuracy")
        after = (s.get("after") or {}).get("accuracy")
        rss = max((s.get("rss_mib_per_process") or {}).get("peak") or [0])
        value = f"accuracy {before} -> {after}, {s.get('tokens_per_s') or 0:.0f} tok/s, peak RSS {rss:.0f} MiB"
        table.append((summary.parent.name, "riemix train", value))
    return table


def main() -> None:
    out = Path(sys.argv[1])
    table = rows(out)
    width = max((len(a) for a, _, _ in table), default=10)
    for source, name, value in table:
        print(f"{source:<{width}}  {name:<24}  {value}")


if __name__ == "__main__":
    main()
