"""riemix.training.report: what a run reports beyond its numbers."""

from __future__ import annotations

from riemix.training.report import result_warnings


def test_a_result_worse_than_zero_shot_is_reported_not_silent():
    from types import SimpleNamespace

    from riemix.training.config import TrainConfig

    state = SimpleNamespace(cfg=TrainConfig(lr=1e6), extra={"before": {"accuracy": 0.79, "loss": 0.5}})
    (warning,) = result_warnings(state, {"accuracy": 0.51, "loss": 9.0})
    assert warning.startswith("accuracy after training (0.5100) is worse than zero-shot (0.7900): check the learning")
    assert "lr=1e+06" in warning
    assert result_warnings(state, {"accuracy": 0.80}) == []
    state.cfg = TrainConfig(early_stopping_metric="loss")
    assert "loss after training (9.0000) is worse" in result_warnings(state, {"loss": 9.0})[0]
    state.extra["before"] = None  # no zero-shot evaluation: nothing to compare
    assert result_warnings(state, {"loss": 9.0}) == []
