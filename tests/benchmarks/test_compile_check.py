"""benchmarks/compile_check.py: a ``--quick`` run under ``aot_eager`` (no C++ compile) writes a sound record."""

from __future__ import annotations

import json

import compile_check
import torch


def test_quick_run_matches_eager_and_reports_breaks(tmp_path):
    out = tmp_path / "compile_check.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared, busy CPU: 2 threads wait on each other for ms per op
    try:
        argv = ["--quick", "--backend", "aot_eager", "--fresh-inputs", "0", "--no-step-explain", "--out", str(out)]
        record = compile_check.main(argv)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert record["benchmark"] == "compile_check" and record["args"]["backend"] == ["aot_eager"]
    rows = {row["row"]: row for row in record["rows"]}
    assert set(rows) == {"layer_dense", "layer_sparse", "train_model", "train_step"}
    for name, row in rows.items():
        assert row["backend"] == "aot_eager" and row["status"] in ("ok", "failed"), name
        explain = row["explain"]
        if explain.get("status") == "failed":
            assert explain["error"], name
            continue
        assert isinstance(explain["graph_count"], int) and explain["graph_count"] >= 1, name
        assert isinstance(explain["graph_break_count"], int) and explain["graph_break_count"] >= 0, name
        assert all(isinstance(reason, str) for reason in explain["break_reasons"] + explain["logged_reasons"])
        if row["status"] == "failed":
            assert row["error"].split(":")[0], name  # "ErrorType: message"
            continue
        med = row["median_seconds"]
        assert set(med) == {"eager", "compiled"} and min(med.values()) > 0, name
        assert row["ratios"]["compiled_over_eager"] == med["compiled"] / med["eager"]
        assert row["max_abs_diff"] < 1e-4, (name, row["max_abs_diff"])
    for name in ("layer_dense", "layer_sparse", "train_model"):  # these compile under aot_eager
        assert rows[name]["status"] == "ok", (name, rows[name].get("error"))
    assert rows["layer_dense"]["explain"]["graph_break_count"] == 0
    assert rows["layer_dense"]["allclose"] and rows["layer_sparse"]["allclose"]
    assert rows["train_model"]["max_param_diff"] < 1e-4
    assert rows["train_step"]["explain_step"] == {"status": "skipped"}
