"""Property tests over random shapes, marginals and regularisation (few examples each)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICE,
    SINKHORN_BACKENDS,
    assert_plan_close_relative,
    has_float64,
    interpreted,
    max_abs,
    pot_sinkhorn_log,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aplot_kernels import sinkhorn

PROPERTY_SETTINGS = settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def problems(draw, max_size=40, max_batch=3, zero_weights=True):
    """``(C, a, b, eps, n_iters)`` in float64: random sizes, costs, marginals (some padded), masses."""
    batch = draw(st.integers(1, max_batch))
    n, m = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 2.0]))
    C = scale * torch.rand(batch, n, m, generator=g, dtype=torch.float64)
    mass = draw(st.sampled_from([1.0, 0.3, 4.0]))

    def weights(size):
        w = torch.rand(batch, size, generator=g, dtype=torch.float64) + 0.05
        if zero_weights and size > 1 and draw(st.booleans()):
            w = w * (torch.rand(batch, size, generator=g) > 0.3)
            w[:, 0] += 0.5  # keep at least one entry per problem
        return mass * w / w.sum(-1, keepdim=True)

    a, b = weights(n), weights(m)
    eps = draw(st.sampled_from([0.05, 0.1, 0.5]))
    n_iters = draw(st.integers(1, 40))
    return C.to(DEVICE), a.to(DEVICE), b.to(DEVICE), eps, n_iters


@PROPERTY_SETTINGS
@given(problem=problems(zero_weights=False))
def test_torch_backend_matches_pot(problem):
    C, a, b, eps, n_iters = problem
    r = sinkhorn(C, a, b, eps=eps, n_iters=n_iters, backend="torch")
    for i in range(C.shape[0]):
        plan, f, g = pot_sinkhorn_log(C[i], a[i], b[i], eps, n_iters)
        assert max_abs(r.plan[i], plan) <= 1e-10
        assert max_abs(r.f[i], f) <= 1e-10 * max(1.0, abs(f).max())
        assert max_abs(r.g[i], g) <= 1e-10 * max(1.0, abs(g).max())


@PROPERTY_SETTINGS
@given(problem=problems())
def test_plan_marginals_and_padding(problem):
    """After a u-update the row marginal is exact; columns converge; padding stays exactly zero."""
    C, a, b, eps, n_iters = problem
    r = sinkhorn(C, a, b, eps=eps, n_iters=n_iters, backend="torch")
    torch.testing.assert_close(r.plan.sum(-1), a, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(r.err, (r.plan.sum(-2) - b).abs().sum(-1), rtol=1e-10, atol=1e-13)
    assert bool((r.plan.transpose(-1, -2)[b == 0] == 0).all()) and bool((r.plan[a == 0] == 0).all())
    assert bool(torch.isfinite(r.reg_cost).all()) and bool(torch.isfinite(r.cost).all())
    converged = sinkhorn(C, a, b, eps=max(eps, 0.1), n_iters=2000, tol=1e-11, backend="torch")
    assert bool((converged.err <= 1e-11).all())
    torch.testing.assert_close(converged.plan.sum(-2), b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
def test_every_backend_matches_torch(backend):
    max_size = 24 if interpreted(backend) else 40

    @settings(
        max_examples=5 if interpreted(backend) else 8,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(problem=problems(max_size=max_size), use_tol=st.booleans())
    def check(problem, use_tol):
        C, a, b, eps, n_iters = problem
        if interpreted(backend):
            n_iters = min(n_iters, 15)
        kwargs = dict(eps=eps, n_iters=n_iters, tol=1e-4 if use_tol else None, check_every=3)
        r = sinkhorn(C.float(), a.float(), b.float(), backend=backend, **kwargs)
        ref = sinkhorn(C.float().double(), a.float().double(), b.float().double(), backend="torch", **kwargs)
        assert_plan_close_relative(r.plan, ref.plan)
        assert bool((r.plan[a == 0] == 0).all())
        if use_tol:
            assert r.n_iters.tolist() == ref.n_iters.tolist()
        if has_float64(backend):
            r64 = sinkhorn(C, a, b, backend=backend, **kwargs)
            ref64 = sinkhorn(C, a, b, backend="torch", **kwargs)
            assert max_abs(r64.plan, ref64.plan) <= 1e-12
            assert r64.n_iters.tolist() == ref64.n_iters.tolist()

    check()
