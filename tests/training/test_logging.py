"""riemix.training.logging: metrics.jsonl (main process only) and the before/after table."""

from __future__ import annotations

import json

from riemix.training.logging import MetricsLogger, format_metrics, format_table


def test_metrics_logger_and_before_after_table(tmp_path):
    MetricsLogger(tmp_path / "off.jsonl", enabled=False).record({"step": 1, "loss": 0.5})
    assert not (tmp_path / "off.jsonl").exists()  # non-main processes write nothing
    log = MetricsLogger(tmp_path / "m.jsonl")
    log.record({"step": 1, "loss": 0.5})
    log.record({"step": 2, "eval": {"accuracy": 0.75}})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5}, {"step": 2, "eval": {"accuracy": 0.75}}]
    assert format_metrics({"accuracy": 0.75, "loss": 0.123456}) == "accuracy=0.7500, loss=0.1235"
    table = format_table({"accuracy": 0.5, "loss": 1.0}, {"accuracy": 0.75}).splitlines()
    assert table[1] == f"{'accuracy':<28} {'0.5000':>10} {'0.7500':>10} {'+0.2500':>10}"
    assert table[2] == f"{'loss':<28} {'1.0000':>10} {'-':>10} {'':>10}"
