"""``sinkhorn`` (docs/contract.md) held to POT and to the float64 torch reference (its conformance figures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    DEVICE,
    assert_finite,
    assert_plan_close_relative,
    interpreted,
    max_abs,
    pot_sinkhorn_log,
    random_cost,
    random_marginal,
    small,
    to_np,
    widest_dtype,
)

import aplot_kernels
from aplot_kernels import sinkhorn

# (B, N, M, iterations, marginals): 1x1, N != M, sizes that are and are not
# powers of two, K = 1 and unconverged counts, non-uniform and mass != 1.
POT_CASES = [
    (1, 1, 1, 1, "uniform"),
    (2, 1, 1, 7, "mass"),
    (1, 1, 6, 3, "nonuniform"),
    (1, 6, 1, 3, "nonuniform"),
    (1, 7, 5, 1, "nonuniform"),
    (2, 7, 5, 4, "uniform"),
    (2, 13, 17, 20, "nonuniform"),
    (3, 8, 16, 9, "mass"),
    (2, 16, 16, 30, "nonuniform"),
    (2, 33, 31, 15, "mass"),
    (1, 64, 64, 40, "nonuniform"),
]


def _marginals(gen, kind, batch, n, m, dtype=torch.float64):
    """``(a, b)`` as passed to ``sinkhorn`` and as the reference sees them."""
    if kind == "uniform":
        a_full = torch.full((batch, n), 1.0 / n, dtype=torch.float64, device=DEVICE)
        b_full = torch.full((batch, m), 1.0 / m, dtype=torch.float64, device=DEVICE)
        return None, None, a_full, b_full
    mass = 2.5 if kind == "mass" else 1.0
    a = random_marginal(gen, batch, n, mass=mass, dtype=dtype)
    b = random_marginal(gen, batch, m, mass=mass, dtype=dtype)
    return a, b, a.double(), b.double()


def _assert_matches_pot(result, C, a, b, eps, n_iters, bound=1e-10):
    for i in range(C.shape[0]):
        plan, f, g = pot_sinkhorn_log(C[i], a[i], b[i], eps, n_iters)
        assert max_abs(result.plan[i], plan) <= bound
        assert max_abs(result.f[i], f) <= bound * max(1.0, np.abs(f).max())
        assert max_abs(result.g[i], g) <= bound * max(1.0, np.abs(g).max())


@pytest.mark.parametrize("batch,n,m,n_iters,kind", POT_CASES)
def test_fixed_iterations_match_pot(float64_backend, gen, batch, n, m, n_iters, kind):
    C = random_cost(gen, batch, n, m)
    a, b, a_full, b_full = _marginals(gen, kind, batch, n, m)
    eps = 0.1
    result = sinkhorn(C, a, b, eps=eps, n_iters=n_iters, backend=float64_backend)
    _assert_matches_pot(result, C, a_full, b_full, eps, n_iters)
    assert result.n_iters.tolist() == [n_iters] * batch


def test_fixed_iterations_unbatched_match_pot(float64_backend, gen):
    C = random_cost(gen, 1, 9, 11)[0]
    a, b = random_marginal(gen, 1, 9)[0], random_marginal(gen, 1, 11)[0]
    result = sinkhorn(C, a, b, eps=0.07, n_iters=12, backend=float64_backend)
    _assert_matches_pot(type(result)(*(t.unsqueeze(0) for t in result)), C[None], a[None], b[None], 0.07, 12)


@pytest.mark.parametrize("eps", [0.05, 0.01])
def test_small_eps_matches_pot(float64_backend, gen, eps):
    """Costs in [0, 2] with eps down to 0.01 (C / eps up to 200)."""
    C = random_cost(gen, 2, 12, 10, scale=2.0)
    a, b = random_marginal(gen, 2, 12), random_marginal(gen, 2, 10)
    result = sinkhorn(C, a, b, eps=eps, n_iters=60, backend=float64_backend)
    assert_finite(plan=result.plan, f=result.f, g=result.g, cost=result.cost, reg_cost=result.reg_cost)
    _assert_matches_pot(result, C, a, b, eps, 60)


def test_converged_matches_pot_batch_solver(float64_backend, gen):
    import ot.batch

    C = random_cost(gen, 3, 10, 14)
    a, b = random_marginal(gen, 3, 10, mass=1.5), random_marginal(gen, 3, 14, mass=1.5)
    eps = 0.1
    result = sinkhorn(C, a, b, eps=eps, n_iters=3000, tol=1e-14, check_every=10, backend=float64_backend)
    reference = ot.batch.solve_batch(C.cpu(), reg=eps, a=a.cpu(), b=b.cpu(), max_iter=5000, tol=1e-15, method="log_sinkhorn")
    assert max_abs(result.plan, reference.plan) <= 1e-9


# ---------------------------------------------------------------------------
# float32 (every backend) against the float64 torch reference
# ---------------------------------------------------------------------------

FLOAT32_CASES = [
    (1, 1, 1, 1, 0.1),
    (1, 7, 5, 1, 0.1),
    (2, 13, 17, 20, 0.1),
    (3, 24, 23, 15, 0.05),
    (2, 16, 16, 25, 0.01),
    (2, 33, 31, 40, 0.1),
    (2, 64, 48, 60, 0.01),
]


@pytest.mark.parametrize("batch,n,m,n_iters,eps", FLOAT32_CASES)
def test_float32_matches_float64_reference(sinkhorn_backend, gen, batch, n, m, n_iters, eps):
    if interpreted(sinkhorn_backend) and max(n, m) > 24:
        pytest.skip("large shape: too slow for the Triton interpreter")
    C = random_cost(gen, batch, n, m, scale=2.0, dtype=torch.float32)
    a = random_marginal(gen, batch, n, mass=1.3, dtype=torch.float32)
    b = random_marginal(gen, batch, m, dtype=torch.float64)
    b = (b * a.double().sum(-1, keepdim=True)).float()
    result = sinkhorn(C, a, b, eps=eps, n_iters=n_iters, backend=sinkhorn_backend)
    reference = sinkhorn(C.double(), a.double(), b.double(), eps=eps, n_iters=n_iters, backend="torch")
    assert result.plan.dtype == torch.float32
    assert_plan_close_relative(result.plan, reference.plan)
    assert_finite(f=result.f, g=result.g, cost=result.cost, reg_cost=result.reg_cost, err=result.err)
    torch.testing.assert_close(result.cost.double(), reference.cost, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.reg_cost.double(), reference.reg_cost, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_float32(sinkhorn_backend, gen, dtype):
    C = random_cost(gen, 2, 9, 6, dtype=dtype)
    b = random_marginal(gen, 2, 6, dtype=torch.float32)
    result = sinkhorn(C, None, b, eps=0.1, n_iters=15, backend=sinkhorn_backend)
    as_float = sinkhorn(C.float(), None, b, eps=0.1, n_iters=15, backend=sinkhorn_backend)
    for name in ("plan", "f", "g", "cost", "reg_cost", "err"):
        assert getattr(result, name).dtype == torch.float32, name
    assert_plan_close_relative(result.plan, as_float.plan)
    torch.testing.assert_close(result.f, as_float.f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.g, as_float.g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.reg_cost, as_float.reg_cost, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.cost, as_float.cost, rtol=1e-5, atol=1e-6)


# The dtype of C -> bounds against the float64 torch reference on the same (rounded) inputs: plan
# (relative to its largest entry), then rtol and atol of cost and dual value (docs/contract.md,
# conformance figures). Half-precision costs are widened exactly, so they hold float32's bounds.
DTYPE_TOLERANCES = [
    pytest.param(torch.float64, 1e-10, 1e-10, 1e-12, marks=pytest.mark.float64_only, id="fp64"),
    pytest.param(torch.float32, 1e-5, 1e-4, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-5, 1e-4, 1e-5, id="bf16"),
    pytest.param(torch.float16, 1e-5, 1e-4, 1e-5, id="fp16"),
]


@pytest.mark.parametrize("dtype, plan_bound, rtol, atol", DTYPE_TOLERANCES)
def test_every_dtype_within_its_bound(sinkhorn_backend, gen, dtype, plan_bound, rtol, atol):
    C = random_cost(gen, 2, 13, 17, scale=2.0, dtype=dtype)
    weights = torch.float64 if dtype == torch.float64 else torch.float32
    a = random_marginal(gen, 2, 13, dtype=weights)
    b = random_marginal(gen, 2, 17, dtype=weights)
    result = sinkhorn(C, a, b, eps=0.05, n_iters=20, backend=sinkhorn_backend)
    reference = sinkhorn(C.double(), a.double(), b.double(), eps=0.05, n_iters=20, backend="torch")
    assert result.plan.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_plan_close_relative(result.plan, reference.plan, bound=plan_bound)
    torch.testing.assert_close(result.cost.double(), reference.cost, rtol=rtol, atol=atol)
    torch.testing.assert_close(result.reg_cost.double(), reference.reg_cost, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# Result fields
# ---------------------------------------------------------------------------


def test_values_are_dual_and_transport_cost(sinkhorn_backend, gen):
    dtype = widest_dtype(sinkhorn_backend)
    C = random_cost(gen, 3, 11, 8, dtype=dtype)
    a, b = random_marginal(gen, 3, 11, mass=2.0, dtype=dtype), random_marginal(gen, 3, 8, mass=2.0, dtype=dtype)
    r = sinkhorn(C, a, b, eps=0.1, n_iters=25, backend=sinkhorn_backend)
    tight = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.reg_cost, (a * r.f).sum(-1) + (b * r.g).sum(-1), **tight)
    torch.testing.assert_close(r.cost, (r.plan * C).sum((-2, -1)), **tight)
    torch.testing.assert_close(r.plan, torch.exp((r.f[:, :, None] + r.g[:, None, :] - C) / 0.1), **tight)


def test_result_shapes_batched_and_unbatched(sinkhorn_backend, gen):
    dtype = widest_dtype(sinkhorn_backend)
    C = random_cost(gen, 2, 5, 7, dtype=dtype)
    batched = sinkhorn(C, eps=0.2, n_iters=5, backend=sinkhorn_backend)
    single = sinkhorn(C[1], eps=0.2, n_iters=5, backend=sinkhorn_backend)
    want = {"plan": (5, 7), "f": (5,), "g": (7,), "cost": (), "reg_cost": (), "n_iters": (), "err": ()}
    assert isinstance(batched, aplot_kernels.SinkhornResult)
    for name, shape in want.items():
        assert tuple(getattr(single, name).shape) == shape, name
        assert tuple(getattr(batched, name).shape) == (2,) + shape, name
        torch.testing.assert_close(getattr(single, name), getattr(batched, name)[1], rtol=1e-6, atol=1e-9)
        expected_dtype = torch.int64 if name == "n_iters" else dtype
        assert getattr(batched, name).dtype == expected_dtype, name
        assert getattr(batched, name).device.type == DEVICE.type, name


def test_module_is_callable_and_marginals_broadcast(gen):
    C = random_cost(gen, 3, 6, 4)
    a, b = random_marginal(gen, 1, 6)[0], random_marginal(gen, 1, 4)[0]
    broadcast = aplot_kernels.sinkhorn(C, a, b, n_iters=5, backend="torch")
    explicit = sinkhorn(C, a.expand(3, 6), b.expand(3, 4), n_iters=5, backend="torch")
    for x, y in zip(broadcast, explicit):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    uniform = sinkhorn(C, n_iters=5, backend="torch")
    explicit = sinkhorn(
        C,
        torch.full((6,), 1 / 6, dtype=C.dtype, device=DEVICE),
        torch.full((4,), 0.25, dtype=C.dtype, device=DEVICE),
        n_iters=5,
        backend="torch",
    )
    torch.testing.assert_close(uniform.plan, explicit.plan, rtol=1e-14, atol=1e-15)


def test_err_computed_at_end_when_never_checked(sinkhorn_backend, gen):
    dtype = widest_dtype(sinkhorn_backend)
    C = random_cost(gen, 2, 8, 6, dtype=dtype)
    b = random_marginal(gen, 2, 6, dtype=dtype)
    for kwargs in (dict(n_iters=7), dict(n_iters=7, tol=1e-30, check_every=10)):
        r = sinkhorn(C, None, b, eps=0.1, backend=sinkhorn_backend, **kwargs)
        expected = (r.plan.double().sum(-2) - b.double()).abs().sum(-1)
        torch.testing.assert_close(r.err.double(), expected, rtol=1e-5, atol=1e-7)
        assert r.n_iters.tolist() == [7, 7]


# ---------------------------------------------------------------------------
# Tolerance mode
# ---------------------------------------------------------------------------


def _expected_tolerance_run(C, a, b, eps, n_iters, tol, check_every):
    """POT-order iterates: ``(count, plan, f, g, err)`` of one problem under per-problem stopping."""
    last_err = None
    for k in range(check_every, n_iters + 1, check_every):
        plan, f, g = pot_sinkhorn_log(C, a, b, eps, k)
        last_err = np.abs(plan.sum(0) - to_np(b)).sum()
        if last_err <= tol:
            return k, plan, f, g, last_err
    plan, f, g = pot_sinkhorn_log(C, a, b, eps, n_iters)
    if last_err is None:
        last_err = np.abs(plan.sum(0) - to_np(b)).sum()
    return n_iters, plan, f, g, last_err


@pytest.mark.parametrize("n_iters,check_every", [(200, 10), (97, 7), (60, 2)])
def test_tolerance_stops_each_problem_on_its_own(float64_backend, gen, n_iters, check_every):
    # Cost scales that converge at different speeds, one that does not converge within the cap.
    scales = torch.tensor([0.05, 1.0, 2.0, 8.0], dtype=torch.float64)
    C = random_cost(gen, 4, 9, 7) * scales[:, None, None].to(DEVICE)
    a, b = random_marginal(gen, 4, 9), random_marginal(gen, 4, 7)
    eps, tol = 0.1, 1e-6
    r = sinkhorn(C, a, b, eps=eps, n_iters=n_iters, tol=tol, check_every=check_every, backend=float64_backend)
    counts = []
    for i in range(4):
        count, plan, f, g, err = _expected_tolerance_run(C[i], a[i], b[i], eps, n_iters, tol, check_every)
        counts.append(count)
        assert int(r.n_iters[i]) == count, f"problem {i}"
        assert max_abs(r.plan[i], plan) <= 1e-10
        assert max_abs(r.f[i], f) <= 1e-10 and max_abs(r.g[i], g) <= 1e-10
        assert abs(float(r.err[i]) - err) <= 1e-10
    assert len(set(counts)) >= 3, f"the case should stop problems at different counts, got {counts}"
    assert counts[-1] == n_iters


def test_tolerance_float32_every_backend(sinkhorn_backend, gen):
    """Kernels stop each problem at the same count as the reference (float32, loose tol)."""
    scales = torch.tensor([0.05, 1.0, 6.0])
    C = random_cost(gen, 3, 9, 7, dtype=torch.float32) * scales[:, None, None].to(DEVICE)
    a, b = random_marginal(gen, 3, 9, dtype=torch.float32), None
    kwargs = dict(eps=0.1, n_iters=small(sinkhorn_backend, 120, 60), tol=1e-3, check_every=5)
    r = sinkhorn(C, a, b, backend=sinkhorn_backend, **kwargs)
    ref = sinkhorn(C, a, b, backend="torch", **kwargs)
    assert r.n_iters.tolist() == ref.n_iters.tolist()
    assert len(set(ref.n_iters.tolist())) >= 2
    assert_plan_close_relative(r.plan, ref.plan, bound=1e-4)
    torch.testing.assert_close(r.err, ref.err, rtol=1e-3, atol=1e-6)


def test_tolerance_zero_runs_to_the_cap(float64_backend, gen):
    C = random_cost(gen, 2, 5, 5)
    fixed = sinkhorn(C, eps=0.5, n_iters=23, backend=float64_backend)
    r = sinkhorn(C, eps=0.5, n_iters=23, tol=0.0, check_every=5, backend=float64_backend)
    assert r.n_iters.tolist() == [23, 23]
    torch.testing.assert_close(r.plan, fixed.plan, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------
# Ragged batches through zero weights
# ---------------------------------------------------------------------------

# The last problem fills the batch's shape (no padding); the interpreter runs the first three.
RAGGED_SIZES = [(5, 7), (9, 3), (1, 4), (9, 7)]


def _ragged_problem(gen, dtype=torch.float64, shuffle=True, sizes=RAGGED_SIZES):
    """Problems of different sizes padded to one batch; padding is scattered, not only trailing."""
    n_max, m_max = max(s[0] for s in sizes), max(s[1] for s in sizes)
    batch = len(sizes)
    C = random_cost(gen, batch, n_max, m_max, dtype=dtype)
    a = torch.zeros(batch, n_max, dtype=dtype, device=DEVICE)
    b = torch.zeros(batch, m_max, dtype=dtype, device=DEVICE)
    rows, cols = [], []
    for i, (n, m) in enumerate(sizes):
        r = torch.randperm(n_max, generator=gen)[:n].sort().values if shuffle else torch.arange(n)
        c = torch.randperm(m_max, generator=gen)[:m].sort().values if shuffle else torch.arange(m)
        a[i, r.to(DEVICE)] = random_marginal(gen, 1, n, mass=1.7, dtype=dtype)[0]
        b[i, c.to(DEVICE)] = random_marginal(gen, 1, m, mass=1.7, dtype=dtype)[0]
        b[i] *= a[i].sum() / b[i].sum()
        rows.append(r.to(DEVICE))
        cols.append(c.to(DEVICE))
    return C, a, b, rows, cols


def test_ragged_batch_matches_each_problem_alone(float64_backend, gen):
    C, a, b, rows, cols = _ragged_problem(gen)
    eps, n_iters = 0.1, 30
    r = sinkhorn(C, a, b, eps=eps, n_iters=n_iters, backend=float64_backend)
    assert_finite(plan=r.plan, cost=r.cost, reg_cost=r.reg_cost, err=r.err)
    for i in range(C.shape[0]):
        sub_c = C[i][rows[i]][:, cols[i]]
        plan, f, g = pot_sinkhorn_log(sub_c, a[i, rows[i]], b[i, cols[i]], eps, n_iters)
        assert max_abs(r.plan[i][rows[i]][:, cols[i]], plan) <= 1e-10
        assert max_abs(r.f[i, rows[i]], f) <= 1e-10 and max_abs(r.g[i, cols[i]], g) <= 1e-10
        # Padding rows and columns are exactly zero.
        assert bool((r.plan[i][a[i] == 0] == 0).all()) and bool((r.plan[i][:, b[i] == 0] == 0).all())
        assert abs(float(r.cost[i]) - float((plan * to_np(sub_c)).sum())) <= 1e-10
        assert abs(float(r.reg_cost[i]) - float((to_np(a[i, rows[i]]) * f).sum() + (to_np(b[i, cols[i]]) * g).sum())) <= 1e-10


def test_ragged_batch_float32_every_backend(sinkhorn_backend, gen):
    C, a, b, rows, cols = _ragged_problem(gen, dtype=torch.float32, sizes=small(sinkhorn_backend, RAGGED_SIZES, RAGGED_SIZES[:3]))
    n_iters = small(sinkhorn_backend, 30, 12)
    for tol in (None, 1e-4):
        r = sinkhorn(C, a, b, eps=0.1, n_iters=n_iters, tol=tol, check_every=5, backend=sinkhorn_backend)
        ref = sinkhorn(C.double(), a.double(), b.double(), eps=0.1, n_iters=n_iters, tol=tol, check_every=5, backend="torch")
        assert_finite(plan=r.plan, cost=r.cost, reg_cost=r.reg_cost, err=r.err)
        assert_plan_close_relative(r.plan, ref.plan)
        assert bool((r.plan[a == 0] == 0).all())
        assert bool((r.plan.transpose(-1, -2)[b == 0] == 0).all())
        if tol is not None:
            assert r.n_iters.tolist() == ref.n_iters.tolist()


@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_ragged_batch_gradients_are_finite(sinkhorn_backend, gen, grad):
    dtype = widest_dtype(sinkhorn_backend)
    C, a, b, _, _ = _ragged_problem(gen, dtype=dtype, sizes=small(sinkhorn_backend, RAGGED_SIZES, RAGGED_SIZES[:3]))
    C, a, b = C.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    r = sinkhorn(C, a, b, eps=0.1, n_iters=small(sinkhorn_backend, 40, 12), grad=grad, backend=sinkhorn_backend)
    loss = r.reg_cost.sum()
    if grad == "implicit":
        loss = loss + r.cost.sum() + (r.plan * torch.rand(r.plan.shape, generator=gen).to(r.plan)).sum()
    grad_c, grad_a, grad_b = torch.autograd.grad(loss, (C, a, b))
    assert_finite(grad_c=grad_c, grad_a=grad_a, grad_b=grad_b)
    # Nothing flows to padding: zero plan rows carry no gradient, centred potentials are 0 there.
    assert bool((grad_a.detach()[a.detach() == 0] == 0).all())
    assert bool((grad_b.detach()[b.detach() == 0] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_auto_backend_works_where_torch_works(gen, dtype):
    """``backend="auto"`` picks some backend for every dtype and returns the reference's numbers."""
    from aplot_kernels import backends, cosine_cost

    x, y = random_cost(gen, 2, 6, 8, dtype=dtype), random_cost(gen, 2, 5, 8, dtype=dtype)
    assert backends.resolve("auto", DEVICE, dtype) in backends.available_backends(DEVICE)
    assert backends.resolve("auto", DEVICE, dtype, needs_reference=True) == "torch"
    C = cosine_cost(x, y)
    torch.testing.assert_close(C, cosine_cost(x, y, backend="torch"), rtol=1e-5, atol=1e-6)
    r = sinkhorn(C, eps=0.1, n_iters=10)
    assert_plan_close_relative(r.plan, sinkhorn(C, eps=0.1, n_iters=10, backend="torch").plan)


def test_strided_inputs(sinkhorn_backend, gen):
    """A transposed cost and stride-0 expanded marginals give the same numbers as contiguous copies."""
    dtype = widest_dtype(sinkhorn_backend)
    C = random_cost(gen, 2, 5, 6, dtype=dtype).transpose(-1, -2)
    a = random_marginal(gen, 1, 6, dtype=dtype).expand(2, 6)
    b = random_marginal(gen, 1, 5, dtype=dtype)[0]
    r = sinkhorn(C, a, b, eps=0.1, n_iters=10, tol=1e-5, check_every=3, backend=sinkhorn_backend)
    ref = sinkhorn(
        C.contiguous(), a.contiguous(), b.expand(2, 5).contiguous(), eps=0.1, n_iters=10, tol=1e-5, check_every=3, backend="torch"
    )
    assert_plan_close_relative(r.plan, ref.plan, bound=1e-6)
    assert r.n_iters.tolist() == ref.n_iters.tolist()


@pytest.mark.parametrize("scale,eps", [(100.0, 0.01), (1e4, 0.1), (-5.0, 0.05)])
def test_extreme_costs_stay_finite(sinkhorn_backend, gen, scale, eps):
    """C / eps up to 1e5 (plan entries underflow) and negative costs: the log domain keeps everything finite."""
    C = random_cost(gen, 2, 6, 5, scale=scale, dtype=torch.float32)
    r = sinkhorn(C, eps=eps, n_iters=20, backend=sinkhorn_backend)
    assert_finite(**r._asdict())
    if (
        abs(scale) / eps <= 200
    ):  # beyond that, float32 rounding of C / eps alone moves the plan (and its marginals) by more than 1e-5
        ref = sinkhorn(C.double(), eps=eps, n_iters=20, backend="torch")
        assert_plan_close_relative(r.plan, ref.plan)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_marginals_are_balanced_up_to_their_rounding(sinkhorn_backend, gen, dtype):
    """Weights 1/5 in bfloat16 sum to 1.0009: balanced within their own rounding, so accepted."""
    C = random_cost(gen, 2, 5, 4, dtype=dtype)
    a = torch.full((5,), 0.2, dtype=dtype, device=DEVICE)
    r = sinkhorn(C, a, eps=0.1, n_iters=10, backend=sinkhorn_backend)
    ref = sinkhorn(C, a, eps=0.1, n_iters=10, backend="torch")
    assert r.plan.dtype == torch.float32
    assert_finite(**r._asdict())
    assert_plan_close_relative(r.plan, ref.plan)
    torch.testing.assert_close(r.plan.sum(-1), a.float().expand(2, 5), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="same total mass"):
        sinkhorn(C, a, torch.full((4,), 0.26, dtype=dtype, device=DEVICE), backend=sinkhorn_backend)
