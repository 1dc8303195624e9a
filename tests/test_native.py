"""The compiled extension (csrc/) on CPU tensors, against the torch reference and POT.

The backend-parametrised suites run "native" too whenever it loads; this file
holds what is specific to it: both float widths, half-precision input,
padding, tolerance mode, the thread-count independence of its results, the
vector exp at the edges of its range, and how a missing build is reported.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from aplot_kernels import _native, backends
from aplot_kernels.cost import native as cost_native
from aplot_kernels.cost import reference as cost_reference
from aplot_kernels.sinkhorn import native, reference

from conftest import assert_plan_close_relative, max_abs, pot_sinkhorn_log, random_cost, random_marginal

CPU = torch.device("cpu")
_ok, _why = _native.status(CPU)
pytestmark = pytest.mark.skipif(not _ok, reason=f"native extension unavailable: {_why}")

FIELDS = ("plan", "f", "g", "cost", "reg_cost", "err")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _padded_marginals(gen, batch, n, m, dtype=torch.float64):
    """Random marginals with zero (padding) entries in the first and the last problem (when large enough)."""
    a = random_marginal(gen, batch, n, dtype=torch.float64, device=CPU)
    b = random_marginal(gen, batch, m, dtype=torch.float64, device=CPU)
    if n >= 4:
        a[0, -2:] = 0
    if m >= 5:
        b[-1, :3] = 0
    return (a / a.sum(-1, keepdim=True)).to(dtype), (b / b.sum(-1, keepdim=True)).to(dtype)


def _assert_same_as_reference(out, ref, rtol):
    for name in FIELDS:
        got, want = getattr(out, name).double(), getattr(ref, name).double()
        scale = max(1.0, float(want.abs().max()))
        assert max_abs(got, want) <= rtol * scale, f"{name}: {max_abs(got, want):.3e}"
    assert torch.equal(out.n_iters, ref.n_iters)
    assert out.n_iters.dtype == torch.int64


@pytest.mark.parametrize(
    "batch,n,m,eps,n_iters",
    [
        (1, 1, 1, 0.1, 1),
        (3, 7, 5, 0.1, 20),
        (4, 24, 31, 0.05, 60),
        (2, 40, 33, 0.01, 150),
        (1, 130, 70, 0.05, 25),
        (1, 515, 520, 0.05, 8),
    ],
)
def test_float64_matches_reference_and_pot(batch, n, m, eps, n_iters):
    gen = _gen(n * m)
    C = random_cost(gen, batch, n, m, scale=2.0, device=CPU)
    a, b = _padded_marginals(gen, batch, n, m)
    out = native.solve(C, a, b, eps, n_iters, None, 10)
    assert out.plan.dtype == torch.float64
    _assert_same_as_reference(out, reference.solve(C, a, b, eps, n_iters, None, 10), 1e-12)
    for i in range(
        batch
    ):  # docs/contract.md section 5: fixed iterations vs POT sinkhorn_log, float64, each problem on its support
        rows, cols = a[i] > 0, b[i] > 0
        plan, f, g = pot_sinkhorn_log(C[i][rows][:, cols], a[i][rows], b[i][cols], eps, n_iters)
        assert max_abs(out.plan[i][rows][:, cols], plan) <= 1e-10


@pytest.mark.parametrize("eps", [0.05, 0.01])
@pytest.mark.parametrize("batch,n,m", [(5, 24, 31), (1, 200, 150)])
def test_float32_within_spec_of_float64_reference(batch, n, m, eps):
    gen = _gen(batch + n)
    C = random_cost(gen, batch, n, m, scale=2.0, device=CPU)
    a, b = _padded_marginals(gen, batch, n, m)
    ref64 = reference.solve(C, a, b, eps, 80, None, 10)
    out = native.solve(C.float(), a.float(), b.float(), eps, 80, None, 10)
    assert out.plan.dtype == torch.float32
    assert_plan_close_relative(out.plan, ref64.plan)
    ref32 = reference.solve(C.float(), a.float(), b.float(), eps, 80, None, 10)
    _assert_same_as_reference(out, ref32, 2e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cost_is_read_and_computed_in_float32(dtype):
    gen = _gen(3)
    C = random_cost(gen, 3, 17, 12, device=CPU).to(dtype)
    a, b = _padded_marginals(gen, 3, 17, 12, torch.float32)
    out = native.solve(C, a, b, 0.05, 30, None, 10)
    assert out.plan.dtype == torch.float32 and out.cost.dtype == torch.float32
    _assert_same_as_reference(out, reference.solve(C.float(), a, b, 0.05, 30, None, 10), 2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padding_is_exact_and_a_ragged_problem_equals_itself_alone(dtype):
    gen = _gen(11)
    C = random_cost(gen, 2, 9, 8, device=CPU).to(dtype)
    a = random_marginal(gen, 2, 9, device=CPU).to(dtype)
    b = random_marginal(gen, 2, 8, device=CPU).to(dtype)
    a[1, 6:] = 0  # problem 1 is really 6 x 5
    b[1, 5:] = 0
    a[1] /= a[1].sum()
    b[1] /= b[1].sum()
    out = native.solve(C, a, b, 0.05, 40, None, 10)
    for name in ("plan", "f", "g", "cost", "reg_cost", "err"):
        assert bool(torch.isfinite(getattr(out, name)).all()), name
    assert bool((out.plan[1, 6:, :] == 0).all()) and bool((out.plan[1, :, 5:] == 0).all())
    assert bool((out.f[1, 6:] == 0).all()) and bool((out.g[1, 5:] == 0).all())
    alone = native.solve(C[1:, :6, :5].contiguous(), a[1:, :6].contiguous(), b[1:, :5].contiguous(), 0.05, 40, None, 10)
    bound = 1e-12 if dtype == torch.float64 else 1e-6
    assert max_abs(out.plan[1, :6, :5], alone.plan[0]) <= bound
    assert abs(float(out.reg_cost[1] - alone.reg_cost[0])) <= bound


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_iters,check_every", [(200, 10), (95, 7), (40, 1), (5, 10)])
def test_tolerance_stops_each_problem_on_its_own(dtype, n_iters, check_every):
    gen = _gen(n_iters)
    C = random_cost(gen, 6, 20, 17, device=CPU)
    C[0] *= 0.1  # an easy problem that stops early
    a, b = _padded_marginals(gen, 6, 20, 17)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    C, a, b = C.to(dtype), a.to(dtype), b.to(dtype)
    out = native.solve(C, a, b, 0.05, n_iters, tol, check_every)
    ref = reference.solve(C, a, b, 0.05, n_iters, tol, check_every)
    _assert_same_as_reference(out, ref, 1e-12 if dtype == torch.float64 else 2e-4)
    if n_iters >= 40 and check_every < 10:
        assert len(set(out.n_iters.tolist())) > 1  # they did stop at different counts


@pytest.mark.parametrize("batch,n,m", [(1, 300, 260), (4, 64, 48), (3, 130, 129), (1, 520, 515)])
def test_results_do_not_depend_on_the_thread_count(batch, n, m):
    gen = _gen(batch * n)
    C = random_cost(gen, batch, n, m, device=CPU).float()
    a, b = _padded_marginals(gen, batch, n, m, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.solve(C, a, b, 0.05, 30, 1e-5, 10)
        torch.set_num_threads(2)
        two = native.solve(C, a, b, 0.05, 30, 1e-5, 10)
    finally:
        torch.set_num_threads(before)
    for name in FIELDS + ("n_iters",):
        assert torch.equal(getattr(one, name), getattr(two, name)), name


def test_expanded_marginals_and_large_costs():
    # Stride-0 marginals (as `sinkhorn` passes uniform weights) and costs whose
    # -C/eps spans the whole float32 exponent range: no NaN, no inf, reference numbers.
    gen = _gen(5)
    C = random_cost(gen, 3, 16, 16, scale=2.0, device=CPU).float()
    C[0, 0, :] = 0.0
    a = torch.full((16,), 1 / 16).expand(3, 16)
    b = torch.full((16,), 1 / 16).expand(3, 16)
    out = native.solve(C, a, b, 0.005, 30, None, 10)
    ref = reference.solve(C, a, b, 0.005, 30, None, 10)
    assert bool(torch.isfinite(out.plan).all())
    assert_plan_close_relative(
        out.plan, reference.solve(C.double(), a.double(), b.double(), 0.005, 30, None, 10).plan, bound=1e-4
    )
    assert max_abs(out.f, ref.f) <= 1e-4 * float(ref.f.abs().max())


def test_public_sinkhorn_and_margin_use_it():
    import aplot_kernels as ak

    gen = _gen(8)
    C = random_cost(gen, 1, 12, 10, device=CPU)[0]
    got = ak.sinkhorn(C, eps=0.1, n_iters=30, backend="native", grad="none")
    want = ak.sinkhorn(C, eps=0.1, n_iters=30, backend="torch", grad="none")
    assert max_abs(got.plan, want.plan) <= 1e-13
    emb_c, emb_r = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    r_c, r_r = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    margin_native = ak.aplot_margin(r_c, r_r, emb_c, emb_r, backend="native")
    margin_torch = ak.aplot_margin(r_c, r_r, emb_c, emb_r, backend="torch")
    assert max_abs(margin_native, margin_torch) <= 1e-5


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("tol", [None, 1e-4])
def test_row_transport_costs_equal_the_reduced_plan(dtype, bound, tol):
    """sum_j P_ij C_ij without storing P equals the reference plan reduced against C (0 on padding)."""
    gen = _gen(31)
    C = random_cost(gen, 3, 37, 29, scale=2.0, device=CPU)
    a, b = _padded_marginals(gen, 3, 37, 29)
    ref = reference.solve(C, a, b, 0.05, 40, tol, 10)
    want = (ref.plan * C).sum(-1)
    got = native.row_transport_costs(C.to(dtype), a.to(dtype), b.to(dtype), 0.05, 40, tol, 10)
    assert got.shape == (3, 37) and got.dtype == dtype
    assert max_abs(got, want) <= bound * float(want.abs().max())
    assert bool((got[0, -2:] == 0).all())  # padded rows


def test_native_margin_never_forms_the_plan(monkeypatch):
    """A detached native margin on CPU tensors reduces plan rows in the kernel (no sinkhorn_solve call)."""
    import aplot_kernels as ak

    gen = _gen(32)
    emb_c, emb_r = torch.randn(9, 16, generator=gen), torch.randn(13, 16, generator=gen)
    r_c, r_r = torch.randn(9, generator=gen), torch.randn(13, generator=gen)
    want = ak.aplot_margin(*(t.double() for t in (r_c, r_r, emb_c, emb_r)), backend="torch")

    def no_plan(*args, **kwargs):
        raise AssertionError("the margin path formed the plan")

    monkeypatch.setattr(native, "solve", no_plan)
    got = ak.aplot_margin(r_c, r_r, emb_c, emb_r, backend="native")
    assert got.dtype == torch.float32
    assert max_abs(got, want) <= 1e-5 * float(want.abs().max())
    got64 = ak.aplot_margin(*(t.double() for t in (r_c, r_r, emb_c, emb_r)), backend="native")
    assert max_abs(got64, want) <= 1e-12 * float(want.abs().max())


def _margin_inputs(gen, shape, dtype):
    """Rewards and embeddings ``[.., n]``, ``[.., m]``, ``[.., n, d]``, ``[.., m, d]`` for ``shape = (*batch, n, m, d)``."""
    *batch, n, m, d = shape
    draw = lambda *size: torch.randn(*batch, *size, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return draw(n), draw(m), draw(n, d), draw(m, d)


@pytest.mark.parametrize("shape", [(16, 16, 64), (9, 13, 33), (1, 2, 5), (2, 7, 12, 20), (40, 57, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("similarity", ["unit", "cosine"])
def test_fused_margin_op_equals_cost_then_row_costs(shape, dtype, similarity):
    """``aplot_margins`` (one op: cost, Sinkhorn row costs, scaling) gives the numbers of the two ops it
    fuses and of the float64 reference, for one problem ([n, d] inputs) or a batch ([B, n, d])."""
    rc, rr, ce, re = _margin_inputs(_gen(sum(shape)), shape, dtype)
    alpha, temperature, eps, n_iters, scale = 0.8, 0.6, 0.07, 37, 1.7
    weight, offset = cost_reference.similarity_terms(alpha, similarity)
    ops = torch.ops.aplot_kernels
    got = ops.aplot_margins(ce, re, rc, rr, alpha, temperature, 1e-8, weight, offset, eps, n_iters, scale)
    batched = ce.dim() == 3
    lift = (lambda t: t) if batched else (lambda t: t.unsqueeze(0))
    cost = ops.aplot_cost(lift(ce), lift(re), lift(rc), lift(rr), alpha, temperature, 1e-8, weight, offset)
    n, m = cost.shape[1:]
    a = torch.full((cost.shape[0], n), 1 / n, dtype=cost.dtype)
    b = torch.full((cost.shape[0], m), 1 / m, dtype=cost.dtype)
    two_ops = ops.sinkhorn_row_costs(cost, a, b, eps, n_iters, -1.0, 1) * (scale * n)
    assert got.dtype == cost.dtype and got.shape == (two_ops if batched else two_ops[0]).shape
    assert torch.equal(got, two_ops if batched else two_ops[0])
    c64 = cost_reference.aplot_cost(*(lift(t).double() for t in (ce, re, rc, rr)), alpha, temperature, 1e-8, similarity)
    plan = reference.solve(c64, a.double(), b.double(), eps, n_iters, None, 1).plan
    want = scale * n * (plan * c64).sum(-1)
    bound = 1e-12 if dtype == torch.float64 else 2e-5
    assert max_abs(got.double(), want if batched else want[0]) <= bound * float(want.abs().max())


def test_fused_margin_op_is_detached():
    """Autograd falls through ``aplot_margins``: no graph node even for inputs that require grad, and the
    loss's gradient reaches the rewards only, as on the reference with ``detach=True``."""
    import aplot_kernels as ak

    rc, rr, ce, re = (t.requires_grad_(True) for t in _margin_inputs(_gen(5), (7, 9, 12), torch.float64))
    margins = torch.ops.aplot_kernels.aplot_margins(ce, re, rc, rr, 0.9, 1.0, 1e-8, 0.05, 1.0, 0.1, 20, 1.0)
    assert margins.grad_fn is None and not margins.requires_grad
    grads = {}
    for backend in ("native", "torch"):
        inputs = [t.detach().clone().requires_grad_(True) for t in (rc, rr, ce, re)]
        ak.aplot_loss(*inputs, backend=backend).backward()
        grads[backend] = [t.grad for t in inputs]
    assert grads["native"][2] is None and grads["native"][3] is None
    for got, want in zip(grads["native"][:2], grads["torch"][:2]):
        assert max_abs(got, want) <= 1e-12


@pytest.mark.parametrize("n,m,d", [(16, 16, 64), (16, 16, 65), (3, 77, 64), (1, 1, 1), (2, 3, 2730), (5, 3, 9000)])
@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_cost_products_below_and_above_the_direct_size(n, m, d, dtype, bound):
    """Products of up to 2^14 multiply-adds run as dot products in the cost's row loop, larger ones as a
    GEMM: both agree with the float64 reference, rows with huge or tiny norms included."""
    gen = _gen(n * m + d)
    x = torch.randn(2, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(2, m, d, generator=gen, dtype=torch.float64)
    x[0, 0] *= 1e25 if dtype == torch.float32 else 1e200  # rows that need their power-of-two scaling
    y[1, -1] *= 1e-25 if dtype == torch.float32 else 1e-200
    rc, rr = torch.randn(2, n, generator=gen, dtype=torch.float64), torch.randn(2, m, generator=gen, dtype=torch.float64)
    got = cost_native.aplot_cost(x.to(dtype), y.to(dtype), rc.to(dtype), rr.to(dtype), 0.7, 0.5, 1e-8)
    want = cost_reference.aplot_cost(x, y, rc, rr, 0.7, 0.5, 1e-8)
    assert max_abs(got.double(), want) <= bound
    got = cost_native.cosine_cost(x.to(dtype), y.to(dtype), 1e-8)
    assert max_abs(got.double(), cost_reference.cosine_cost(x, y, 1e-8)) <= bound * 2


def test_scratch_memory_is_reused_across_sizes():
    """The solver's scratch memory is kept between calls up to a size and then allocated per call: a
    sequence of small, large and small problems (and their batches) gives the reference's numbers."""
    gen = _gen(41)
    for batch, n, m in ((1, 16, 16), (1, 300, 301), (3, 5, 70), (2, 300, 301), (1, 16, 16), (4, 33, 9)):
        C = 2 * torch.rand(batch, n, m, generator=gen, dtype=torch.float64)
        a, b = torch.full((batch, n), 1 / n, dtype=torch.float64), torch.full((batch, m), 1 / m, dtype=torch.float64)
        want = reference.solve(C, a, b, 0.05, 25, None, 1)
        got = native.solve(C, a, b, 0.05, 25, None, 1)
        assert max_abs(got.plan, want.plan) <= 1e-12 * float(want.plan.abs().max())
        rows = native.row_transport_costs(C, a, b, 0.05, 25)
        assert max_abs(rows, (want.plan * C).sum(-1)) <= 1e-12


# ---------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------


def test_cosine_cost_float64_matches_pot_and_zero_vectors_cost_one():
    import ot

    gen = _gen(21)
    x = torch.randn(2, 9, 33, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 7, 33, generator=gen, dtype=torch.float64)
    got = cost_native.cosine_cost(x, y, 1e-8)
    for i in range(2):
        assert max_abs(got[i], ot.dist(x[i].numpy(), y[i].numpy(), metric="cosine")) <= 1e-12
    x[0, 3] = 0
    got = cost_native.cosine_cost(x, y, 1e-8)
    assert bool(torch.isfinite(got).all()) and bool((got[0, 3] == 1).all())
    assert max_abs(got, cost_reference.cosine_cost(x, y, 1e-8)) <= 1e-12


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_aplot_cost_matches_reference(dtype, bound):
    gen = _gen(22)
    ce = torch.randn(3, 19, 40, generator=gen, dtype=torch.float64).to(dtype)
    re = torch.randn(3, 11, 40, generator=gen, dtype=torch.float64).to(dtype)
    rc = torch.randn(3, 19, generator=gen, dtype=torch.float64).to(dtype)
    rr = torch.randn(3, 11, generator=gen, dtype=torch.float64).to(dtype)
    re[1, 2] = 0
    got = cost_native.aplot_cost(ce, re, rc, rr, 0.7, 0.5, 1e-8)
    assert got.dtype == dtype
    assert max_abs(got, cost_reference.aplot_cost(ce, re, rc, rr, 0.7, 0.5, 1e-8)) <= bound


def test_costs_promote_half_and_mixed_inputs():
    gen = _gen(23)
    x = torch.randn(2, 5, 16, generator=gen).half()
    y = torch.randn(2, 4, 16, generator=gen).bfloat16()
    got = cost_native.cosine_cost(x, y, 1e-8)
    assert got.dtype == torch.float32
    assert max_abs(got, cost_reference.cosine_cost(x.float(), y.float(), 1e-8)) <= 1e-6
    rc, rr = torch.randn(2, 5, generator=gen, dtype=torch.float64), torch.randn(2, 4, generator=gen)
    got = cost_native.aplot_cost(x, y, rc, rr, 0.9, 1.0, 1e-8)
    assert got.dtype == torch.float64
    want = cost_reference.aplot_cost(x.double(), y.double(), rc, rr.double(), 0.9, 1.0, 1e-8)
    assert max_abs(got, want) <= 1e-12


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def test_extension_module_reports_its_build():
    module = _native._module
    assert isinstance(module.WITH_CUDA, bool)
    assert module.CPU_ISA in ("avx2", "generic")
    assert backends.resolve("native", CPU, torch.float32) == "native"


def test_generic_cpu_loops_match_the_reference():
    """The portable (non-AVX2) loops, forced with APLOT_KERNELS_CPU_ISA=generic in a fresh interpreter."""
    script = """
import torch
from aplot_kernels import _native
from aplot_kernels.cost import native as cost_native, reference as cost_reference
from aplot_kernels.sinkhorn import native, reference
assert _native.status(torch.device("cpu"))[0] and _native._module.CPU_ISA == "generic", _native._module.CPU_ISA
gen = torch.Generator().manual_seed(5)
for batch, n, m, eps, tol in ((3, 7, 5, 0.1, None), (2, 37, 29, 0.02, 1e-6), (1, 130, 70, 0.05, None)):
    C = 2 * torch.rand(batch, n, m, generator=gen, dtype=torch.float64)
    a = torch.rand(batch, n, generator=gen, dtype=torch.float64) + 0.2
    b = torch.rand(batch, m, generator=gen, dtype=torch.float64) + 0.2
    a[0, -1] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    want = reference.solve(C, a, b, eps, 60, tol, 10)
    got = native.solve(C, a, b, eps, 60, tol, 10)
    assert (got.plan - want.plan).abs().max() <= 1e-12 * want.plan.abs().max()
    assert torch.equal(got.n_iters, want.n_iters)
    got32 = native.solve(C.float(), a.float(), b.float(), eps, 60, tol, 10)
    assert (got32.plan.double() - want.plan).abs().max() <= 1e-5 * want.plan.abs().max()
    rows = native.row_transport_costs(C, a, b, eps, 60, tol, 10)
    assert (rows - (want.plan * C).sum(-1)).abs().max() <= 1e-12
x, y = torch.randn(2, 9, 33, generator=gen, dtype=torch.float64), torch.randn(2, 11, 33, generator=gen, dtype=torch.float64)
rc, rr = torch.randn(2, 9, generator=gen, dtype=torch.float64), torch.randn(2, 11, generator=gen, dtype=torch.float64)
got = cost_native.aplot_cost(x, y, rc, rr, 0.9, 0.7, 1e-8)
want = cost_reference.aplot_cost(x, y, rc, rr, 0.9, 0.7, 1e-8)
assert (got - want).abs().max() <= 1e-12
margins = torch.ops.aplot_kernels.aplot_margins(x, y, rc, rr, 0.9, 0.7, 1e-8, 0.05, 1.0, 0.1, 30, 2.0)
plan = reference.solve(want, torch.full((2, 9), 1 / 9, dtype=torch.float64), torch.full((2, 11), 1 / 11, dtype=torch.float64), 0.1, 30, None, 1).plan
assert (margins - 2.0 * 9 * (plan * want).sum(-1)).abs().max() <= 1e-12
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, APLOT_KERNELS_CPU_ISA="generic", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_unavailable_build_is_reported_and_auto_falls_back():
    # A fresh interpreter where the installed module cannot be imported and the
    # build on first use is switched off.
    script = """
import sys, warnings, torch
sys.modules["aplot_kernels._C"] = None  # makes `from . import _C` fail
from aplot_kernels import _native, backends
ok, why = _native.status(torch.device("cpu"))
assert not ok and "APLOT_KERNELS_NO_JIT" in why, why
try:
    backends.resolve("native", torch.device("cpu"), torch.float32)
except backends.BackendUnavailableError as exc:
    assert "native" in str(exc)
else:
    raise AssertionError("backend='native' did not raise")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
assert any("native" in str(w.message) for w in caught)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, APLOT_KERNELS_NO_JIT="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_vector_exp_edges_through_the_plan():
    # exp of exactly -inf (padding) is 0, tiny values underflow to 0 without
    # NaN, and values near 0 are accurate: checked through one-iteration plans.
    C = torch.tensor([[[0.0, 1e3], [2.0, 3.0]]], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        out = native.solve(C.to(dtype), a.to(dtype), b.to(dtype), 1.0, 1, None, 10)
        ref = reference.solve(C.to(dtype), a.to(dtype), b.to(dtype), 1.0, 1, None, 10)
        assert bool(torch.isfinite(out.plan).all())
        assert bool((out.plan[0, 1] == 0).all())
        np.testing.assert_allclose(out.plan.double().numpy(), ref.plan.double().numpy(), rtol=1e-6, atol=1e-30)
