"""Drift compensation of stored head statistics: exact for an affine drift."""

import torch

from cl_hres.nn.drift_compensation import DriftEstimator, compensate_head
from cl_hres.nn.heads import NCMHead, RidgeHead


def _affine(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(
        d, d, generator=gen, dtype=torch.float64
    )
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    return m, b


def test_compensated_statistics_equal_those_of_the_moved_features():
    torch.manual_seed(0)
    d, n = 6, 200
    f = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, 4, (n,))
    m, b = _affine(d)
    for cls in (RidgeHead, NCMHead):
        stale, fresh = cls(d), cls(d)
        stale.update(f, y)
        fresh.update(f @ m.T + b, y)
        assert compensate_head(stale, m, b)
        assert torch.allclose(stale.class_sums, fresh.class_sums, atol=1e-9)
        if cls is RidgeHead:
            assert torch.allclose(stale.gram, fresh.gram, atol=1e-8)
            stale.fit()
            fresh.fit()
            assert torch.allclose(stale.weight, fresh.weight, atol=1e-4)


def test_estimator_recovers_an_affine_drift_from_paired_features():
    torch.manual_seed(1)
    d = 5
    m, b = _affine(d, seed=3)
    est = DriftEstimator(d, ridge=1e-9)
    for _ in range(4):
        before = torch.randn(64, d, dtype=torch.float64)
        est.update(before, before @ m.T + b)
    m_hat, b_hat = est.solve()
    assert torch.allclose(m_hat, m, atol=1e-5) and torch.allclose(b_hat, b, atol=1e-5)


def test_no_drift_is_the_identity():
    d = 4
    est = DriftEstimator(d)
    x = torch.randn(50, d, dtype=torch.float64)
    est.update(x, x)
    m_hat, b_hat = est.solve()
    assert torch.allclose(m_hat, torch.eye(d, dtype=torch.float64), atol=1e-6)
    assert b_hat.abs().max() < 1e-6


def test_projected_heads_are_left_alone():
    head = RidgeHead(4, projection=16)
    head.update(torch.randn(10, 4), torch.randint(0, 2, (10,)))
    before = head.class_sums.clone()
    assert not compensate_head(
        head, torch.eye(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
    )
    assert torch.equal(head.class_sums, before)
