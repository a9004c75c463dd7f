"""route(): gate values, selection (top-k, top-p, noisy, ties) and the gate-rescaling coefficients."""

from __future__ import annotations

import pytest
import torch

from riemix.core.routing import gate_grad_coefficients, route, top_p_select

F64 = torch.float64


def test_gate_grad_coefficients_values():
    g = torch.tensor([[0.0, 0.25, 0.75]], dtype=torch.float64)
    torch.testing.assert_close(gate_grad_coefficients(g, 1.0), g)
    torch.testing.assert_close(
        gate_grad_coefficients(g, 0.5), torch.tensor([[0.0, 0.5, 0.75**0.5]], dtype=torch.float64)
    )
    torch.testing.assert_close(gate_grad_coefficients(g, 0.0), torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "dense"])
def test_gates_sum_to_one_and_respect_top_k(mode):
    logits = torch.randn(13, 6)
    gates, selected = route(logits, mode, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(13))
    expected = 6 if mode == "dense" else 3
    assert (selected.sum(-1) == expected).all()
    assert ((gates > 0) == selected).all()


def test_route_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown routing mode 'nope'"):
        route(torch.randn(2, 4), "nope", 2)


def test_top_p_selection_on_hand_made_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]], dtype=F64)
    assert top_p_select(probs, 0.45, 4).tolist()[0] == [True, False, False, False]
    assert top_p_select(probs, 0.79, 4).tolist()[0] == [True, True, False, False]
    assert top_p_select(probs, 0.81, 4).tolist()[1] == [False, True, True, True]
    assert top_p_select(probs, 0.99, 2).tolist()[0] == [True, True, False, False]  # capped at top_k
    assert top_p_select(probs, 1e-9, 4).sum(-1).tolist() == [1, 1, 1]  # at least one
    assert top_p_select(probs, 0.6, 4)[2].sum() == 3  # uniform: ceil(0.6·4) experts
    gates, sel = route(probs.log(), "top_p", 4, top_p=0.79)
    torch.testing.assert_close(gates[0], torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=F64))
    assert sel.sum(-1).tolist() == [2, 2, 4]


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "top_p"])
def test_exact_ties_select_the_lowest_indices(mode):
    gates, selected = route(torch.zeros(1000, 6), mode, 2, top_p=0.3)
    assert selected[:, :2].all() and not selected[:, 2:].any()
    torch.testing.assert_close(gates[:, :2], torch.full((1000, 2), 0.5))
