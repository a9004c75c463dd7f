"""Expert geometry: Gram matrices, cosine similarities, singular values and effective rank."""

from __future__ import annotations

import pytest
import torch

from riemix.core.geometry import (
    cosine_similarity_a,
    cosine_similarity_ba,
    effective_rank,
    expert_gram_ba,
    expert_singular_values,
)

D = torch.float64


def test_gram_ba_matches_explicit_products():
    torch.manual_seed(1)
    a, b = torch.randn(3, 2, 7, dtype=D), torch.randn(3, 5, 2, dtype=D)
    prods = torch.stack([b[i] @ a[i] for i in range(3)]).reshape(3, -1)  # (E, out·in), reference
    torch.testing.assert_close(expert_gram_ba(a, b), prods @ prods.t())
    ref_cos = torch.nn.functional.cosine_similarity(prods[:, None], prods[None], dim=-1)
    torch.testing.assert_close(cosine_similarity_ba(a, b), ref_cos)
    flat = a.reshape(3, -1)
    torch.testing.assert_close(
        cosine_similarity_a(a), torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    )


def test_effective_rank_rank_one_and_equal_singular_values():
    torch.manual_seed(0)
    r = 3
    # expert 0: rank 1 (B has one non-zero column); expert 1: BA = Q₁ diag(2,2,2) Q₂ᵀ, equal σ
    b0 = torch.zeros(6, r, dtype=D)
    b0[:, 0] = torch.randn(6, dtype=D)
    a0 = torch.randn(r, 8, dtype=D)
    q1, _ = torch.linalg.qr(torch.randn(6, r, dtype=D))
    q2, _ = torch.linalg.qr(torch.randn(8, r, dtype=D))
    b1, a1 = 2 * q1, q2.t()
    a, b = torch.stack([a0, a1]), torch.stack([b0, b1])
    sv = expert_singular_values(a, b)
    ref = torch.stack([torch.linalg.svdvals(b[i] @ a[i])[:r] for i in range(2)])  # explicit out × in
    torch.testing.assert_close(sv, ref, atol=1e-10, rtol=1e-10)
    erank = effective_rank(sv)
    assert erank[0].item() == pytest.approx(1.0, abs=1e-6)
    assert erank[1].item() == pytest.approx(float(r))
    assert effective_rank(torch.zeros(2, 3)).tolist() == [0.0, 0.0]
    # σ = (1, 1, 0, 0) -> p = (.5, .5) -> exp(log 2) = 2
    assert effective_rank(torch.tensor([1.0, 1.0, 0.0, 0.0])).item() == pytest.approx(2.0)
