"""Zero-shot accuracy of a causal LM on the multiple-choice sets, ``cloze`` against ``letter``, with chance level.

This decides where the ``letter`` formulation is worth a training comparison: only where the model rises
above chance. Chance is the mean of 1/(number of choices) over the evaluated examples. Evaluates a fixed
subset (``Dataset.subset(n, seed=0)``) of each dev/test split. Prints a table and writes
``benchmarks/results/zero_shot_formats.json``.

    python benchmarks/zero_shot_formats.py --data-dir ../shared/data
    python benchmarks/zero_shot_formats.py --quick
"""

from __future__ import annotations

import json
import os
import time

from lib.harness import record_header, script_parser, write_record

TASKS = ["commonsense_qa", "openbookqa", "arc_easy", "scienceqa"]


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--data-dir", default=os.environ.get("RIEMIX_DATA_DIR"))
    parser.add_argument("--subset", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="16 examples of ARC-Easy only")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.subset = ["arc_easy"], 16

    from riemix.data import load_dataset
    from riemix.evaluate import evaluate
    from riemix.hub import load_model
    from riemix.tasks import FORMATS, TaskModel, TaskSpec

    model, tok = load_model(args.model)
    task_model = TaskModel(model, "causal_lm")
    rows = {}
    for task in args.tasks:
        dev = load_dataset(task, "dev", args.data_dir)
        dev = dev.subset(min(args.subset, len(dev)), seed=0)
        row = {"examples": len(dev), "chance": sum(1 / len(ex.choices) for ex in dev.examples) / len(dev)}
        for fmt in FORMATS:
            t0 = time.time()
            spec = TaskSpec.for_dataset(dev, "causal_lm", format=fmt)
            row[fmt] = evaluate(task_model, dev, spec, tok, 32)["accuracy"]
            row[f"{fmt}_seconds"] = time.time() - t0
        rows[task] = row
        print(json.dumps({task: row}), flush=True)
    print(f"\n{args.model}, zero-shot, fixed dev subsets")
    print(f"{'task':<16} {'n':>5} {'chance':>7} {'cloze':>7} {'letter':>7}")
    for task, r in rows.items():
        print(f"{task:<16} {r['examples']:5d} {r['chance']:7.3f} {r['cloze']:7.3f} {r['letter']:7.3f}")
    record = {**record_header("zero_shot_formats"), "model": args.model, "tasks": rows}
    write_record(record, "zero_shot_formats", args.quick)


if __name__ == "__main__":
    main()
