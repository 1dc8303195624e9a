"""Numerical edge cases (docs/precision.md): tiny positive weights, second derivatives of the
envelope gradient, and options too small to compute in the input's precision.

Each case is one that gave NaN, inf or a wrong number before; each runs on every backend it touches
(Triton under the interpreter at tiny shapes).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICE,
    KERNEL_SINKHORN_BACKENDS,
    SINKHORN_BACKENDS,
    assert_finite,
    assert_plan_close_relative,
    has_float64,
    interpreted,
    max_abs,
)

from aplot_kernels import aplot_cost, aplot_loss, aplot_margin, cosine_cost, sinkhorn

F32_TINY = torch.finfo(torch.float32).tiny


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _balanced(a, b):
    """``b`` rescaled in float64 to the total of ``a`` (weights far below 1e-5 do not move the total)."""
    return b * (a.double().sum() / b.double().sum()).to(b.dtype)


def _tiny_weight_case(name):
    """``(C, a, b, eps, n_iters)`` of a problem with a tiny positive weight (reported failures)."""
    g = _gen(len(name))
    if name.startswith("2x2"):  # the native plan was all NaN
        a = torch.tensor([1e-30, 1.0])
        return torch.tensor([[0.0, 0.0], [1.0, 0.0]]), a, a.clone(), 0.01, int(name.split("-")[1])
    if name == "3x3-1e-38":  # native f was [nan, inf, inf]
        a, b = torch.tensor([1e-38, 0.5, 0.5]), torch.tensor([0.25, 1e-38, 0.75])
        return torch.rand(3, 3, generator=g), a, b, 0.01, 20
    if name == "5x7-padding":  # tiny weights beside exact zeros and ordinary ones
        a = torch.tensor([0.0, 1e-37, 0.3, 1e-20, 0.7])
        b = torch.tensor([0.2, 0.0, 1e-36, 0.3, 0.1, 0.0, 0.4])
        return 3 * torch.rand(5, 7, generator=g), a, _balanced(a, b), 0.02, 25
    if name == "mass-1e30":  # weights from 1e-8 to 1e30 in one problem
        a, b = torch.tensor([1e30, 1e-8, 3e29, 7e29]), torch.tensor([1e-6, 1e30, 1e30])
        return torch.rand(4, 3, generator=g), a, _balanced(a, b), 0.02, 20
    if name == "float64-1e-160":  # all NaN: the same underflow below exp(-708)
        a = torch.tensor([1e-160, 1.0], dtype=torch.float64)
        return torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64), a, a.clone(), 1e-3, 20
    if name == "float64-1e-300":
        a = torch.tensor([1e-300, 0.2, 0.3, 0.5], dtype=torch.float64)
        b = torch.tensor([0.0, 0.25, 1e-290, 0.25, 0.5], dtype=torch.float64)
        return torch.rand(4, 5, generator=g, dtype=torch.float64), a, _balanced(a, b), 2e-3, 15
    if name == "4x1000-1e-37":  # f shifted by 0.05 through subnormal kernel entries
        a, b = torch.tensor([1e-37, 0.4, 0.3, 0.3]), torch.full((1000,), 1e-3)
        return torch.rand(4, 1000, generator=g), a, _balanced(a, b), 0.05, 30
    raise KeyError(name)


TINY_CASES = [
    "2x2-2",
    "2x2-3",
    "2x2-12",
    "3x3-1e-38",
    "5x7-padding",
    "mass-1e30",
    "float64-1e-160",
    "float64-1e-300",
    "4x1000-1e-37",
]


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_positive_weights_match_reference(sinkhorn_backend, case):
    """A positive weight is not padding, however small: every backend gives the float64 log-domain
    numbers, finite, with the contract's float32 bound (1e-10 in float64)."""
    C, a, b, eps, n_iters = _tiny_weight_case(case)
    if C.dtype == torch.float64 and not has_float64(sinkhorn_backend):
        pytest.skip("float64 case")
    if (interpreted(sinkhorn_backend) or sinkhorn_backend == "torch") and C.numel() > 64:
        pytest.skip("large case: the Triton interpreter is slow; torch (the reference) slows down on subnormals")
    C, a, b = (t.to(DEVICE) for t in (C, a, b))
    for tol in (None, 1e-9):
        options = {"eps": eps, "n_iters": n_iters, "tol": tol, "check_every": 4}
        r = sinkhorn(C, a, b, backend=sinkhorn_backend, **options)
        ref = sinkhorn(C.double(), a.double(), b.double(), backend="torch", **options)
        assert_finite(**r._asdict())
        bound = 1e-10 if C.dtype == torch.float64 else 1e-5
        assert_plan_close_relative(r.plan, ref.plan, bound=bound)
        for name in ("f", "g"):
            want = getattr(ref, name)
            assert max_abs(getattr(r, name), want) <= 2 * bound * max(1.0, float(want.abs().max())), name
        assert r.n_iters.tolist() == ref.n_iters.tolist()
        assert bool((r.plan[a == 0] == 0).all()) and bool((r.plan[:, b == 0] == 0).all())


@pytest.mark.parametrize("backend", [b for b in KERNEL_SINKHORN_BACKENDS if not interpreted(b)])
def test_tiny_weight_problem_beside_ordinary_ones(backend):
    """One problem of a batch that needs the log domain leaves its neighbours' numbers alone."""
    g = _gen(3)
    C = torch.rand(4, 50, 37, generator=g, device="cpu").to(DEVICE)
    a, b = torch.full((4, 50), 1 / 50, device=DEVICE), torch.full((4, 37), 1 / 37, device=DEVICE)
    a[2, 7], b[2, 3] = 1e-36, 1e-33
    a[2], b[2] = a[2] / a[2].double().sum().float(), b[2] / b[2].double().sum().float()
    r = sinkhorn(C, a, b, eps=0.01, n_iters=40, backend=backend)
    ref = sinkhorn(C.double(), a.double(), b.double(), eps=0.01, n_iters=40, backend="torch")
    assert_finite(**r._asdict())
    assert_plan_close_relative(r.plan, ref.plan)
    assert max_abs(r.f, ref.f) <= 1e-5 and max_abs(r.g, ref.g) <= 1e-5


@pytest.mark.skipif("native" not in SINKHORN_BACKENDS or DEVICE.type != "cpu", reason="native CPU solver")
@pytest.mark.parametrize("batch, n, m", [(1, 300, 260), (5, 40, 33)])
def test_native_log_domain_fallback_does_not_depend_on_the_thread_count(batch, n, m):
    """Whether a problem leaves the scaling domain is decided from sums formed in a fixed order."""
    from aplot_kernels.sinkhorn import native

    g = _gen(batch * n)
    C = torch.rand(batch, n, m, generator=g)
    a, b = torch.rand(batch, n, generator=g) + 0.1, torch.rand(batch, m, generator=g) + 0.1
    a[:, 1], b[:, 2], a[-1, 3] = 1e-33, 1e-36, 0.0
    a, b = a / a.double().sum(-1, keepdim=True).float(), b / b.double().sum(-1, keepdim=True).float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.solve(C, a, b, 0.02, 30, 1e-6, 7)
        torch.set_num_threads(2)
        two = native.solve(C, a, b, 0.02, 30, 1e-6, 7)
    finally:
        torch.set_num_threads(before)
    for name, value in one._asdict().items():
        assert torch.equal(value, getattr(two, name)), name
    assert_finite(**{k: v for k, v in one._asdict().items() if k != "n_iters"})


# ---------------------------------------------------------------------------
# Options that cannot be computed in the input's precision
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "eps, scale, dtype",
    [
        (1e-45, 1.0, torch.float32),  # eps itself subnormal: the plan was NaN on every backend
        (1e-39, 0.0, torch.float32),  # subnormal even for a zero cost
        (1e-30, 1.0, torch.float32),  # normal, but max|C| / eps = 1e30 > 2^23
        (1e-8, 1.0, torch.bfloat16),  # half inputs compute in float32: the same limit
        (1e-310, 0.0, torch.float64),  # subnormal in float64
        (1e-20, 1.0, torch.float64),  # max|C| / eps = 1e20 > 2^52
    ],
)
def test_sinkhorn_eps_too_small_is_rejected(sinkhorn_backend, eps, scale, dtype):
    if dtype == torch.float64 and not has_float64(sinkhorn_backend):
        pytest.skip("float64 case")
    C = (scale * torch.rand(3, 4, generator=_gen(0))).to(dtype).to(DEVICE)
    with pytest.raises(ValueError, match="`eps`"):
        sinkhorn(C, eps=eps, backend=sinkhorn_backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smallest_accepted_eps_computes(sinkhorn_backend, dtype):
    """At the limits (the smallest normal eps; max|C| / eps near 1 / machine epsilon) the plan is finite
    and, where the cost in units of eps is small, matches the float64 reference."""
    if dtype == torch.float64 and not has_float64(sinkhorn_backend):
        pytest.skip("float64 case")
    info = torch.finfo(dtype)
    C = torch.rand(3, 5, generator=_gen(1), dtype=torch.float64)
    for eps, scale, bound in ((info.tiny, 20 * info.tiny, 1e-5), (1e-3, 0.5e-3 / info.eps, None)):
        Cs = (scale * C).to(dtype).to(DEVICE)
        r = sinkhorn(Cs, eps=eps, n_iters=10, backend=sinkhorn_backend)
        assert_finite(**r._asdict())
        if bound is not None:
            ref = sinkhorn(Cs.double(), eps=eps, n_iters=10, backend="torch")
            assert_plan_close_relative(r.plan, ref.plan, bound=bound)


def _cost_inputs(dtype=torch.float32):
    g = _gen(2)
    x, y = torch.randn(3, 4, generator=g, dtype=dtype), torch.randn(2, 4, generator=g, dtype=dtype)
    y[0] = 0  # a zero vector: its norm is clamped at eps
    rewards = torch.tensor([1.0, 2.0, 3.0], dtype=dtype), torch.tensor([1.0, 3.0], dtype=dtype)  # zero gaps
    return [t.to(DEVICE) for t in (x, y, *rewards)]


def test_cost_options_too_small_are_rejected(cost_backend):
    x, y, rc, rr = _cost_inputs()
    with pytest.raises(ValueError, match="`eps`"):
        cosine_cost(x, y, eps=1e-46, backend=cost_backend)
    with pytest.raises(ValueError, match="`temperature`"):
        aplot_cost(x, y, rc, rr, temperature=1e-39, backend=cost_backend)
    with pytest.raises(ValueError, match="`eps`"):
        aplot_cost(x, y, rc, rr, eps=1e-40, backend=cost_backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smallest_accepted_cost_options_compute(cost_backend, dtype):
    """The smallest normal temperature with a zero reward gap, and the smallest normal norm clamp with a
    zero vector: finite, and equal to the float64 reference."""
    if dtype == torch.float64 and not has_float64(cost_backend):
        pytest.skip("float64 case")
    x, y, rc, rr = _cost_inputs(dtype)
    tiny = torch.finfo(dtype).tiny
    cos = cosine_cost(x, y, eps=tiny, backend=cost_backend)
    apl = aplot_cost(x, y, rc, rr, temperature=tiny, eps=tiny, backend=cost_backend)
    assert_finite(cosine=cos, aplot=apl)
    want_cos = cosine_cost(x.double(), y.double(), eps=tiny, backend="torch")
    want_apl = aplot_cost(*(t.double() for t in (x, y, rc, rr)), temperature=tiny, eps=tiny, backend="torch")
    assert max_abs(cos, want_cos) <= 1e-6 and max_abs(apl, want_apl) <= 1e-6
    assert bool((cos[:, 0] == 1).all())  # a zero vector costs 1 to everything


def test_loss_options_too_small_are_rejected():
    x, y, rc, _ = _cost_inputs()
    emb = torch.cat([x, y[:1]])[:3]
    with pytest.raises(ValueError, match="`temperature`"):
        aplot_loss(rc, rc, x, emb, temperature=1e-40)
    with pytest.raises(ValueError, match="`eps`"):
        aplot_margin(rc, rc, x, emb, eps=1e-8)  # the APLOT cost reaches 1: 1 / 1e-8 > 2^23
    assert_finite(margin=aplot_margin(rc, rc, x, emb, eps=1e-6, temperature=F32_TINY))
