"""riemix.diagnostics.check_init as a library: arguments are checked before any model is loaded."""

from __future__ import annotations

import pytest

from riemix.diagnostics.check_init import check_init


def test_check_init_rejects_bad_arguments_before_loading_a_model(tmp_path):
    with pytest.raises(ValueError, match=r"--threshold must be >= 0, got -1"):
        check_init("no-such-model", threshold=-1)
    with pytest.raises(ValueError, match=r"--trained needs a run directory with config.yaml"):
        check_init(str(tmp_path), trained=True)
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        check_init("no-such-model", dtype="int8")
