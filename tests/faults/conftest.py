"""Fixtures of the fault-injection tests: one torch thread, shared tiny inputs, the uninterrupted run."""

from __future__ import annotations

import pytest

from tests.faults.common import fault_cfg, one_torch_thread
from tests.helpers import save_tiny_model_dir, write_mcq


@pytest.fixture(scope="package", autouse=True)
def _stop_the_forkserver():
    """Stop the children's forkserver (tests.faults.killer) after the last fault test: it holds ~400 MB."""
    yield
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # private, but present since Python 3.8
    if stop is not None:
        stop()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run the fault tests (and, see ``tests.faults.killer``, their children) on one torch thread.

    The machine is small and shared; one thread also makes the parent and its children compute alike, so
    their tensors can be compared bit for bit.
    """
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def fault_inputs(tmp_path_factory):
    """(training data file of 32 multiple-choice examples, tiny Llama model directory), built once."""
    root = tmp_path_factory.mktemp("fault_inputs")
    return write_mcq(root / "train.jsonl", 32, 0), save_tiny_model_dir(root)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, fault_inputs):
    """The uninterrupted run of ``fault_cfg`` (read only): what every interrupted and resumed run must match."""
    from riemix.training.recipe import train

    out = tmp_path_factory.mktemp("fault_reference") / "run"
    with one_torch_thread():
        train(fault_cfg(out, fault_inputs))
    return out
