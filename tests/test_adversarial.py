"""Property tests of Sinkhorn on adversarial inputs, on every backend and input dtype.

Hypothesis draws weights from 1e-38 to 1 (to 1e-300 in float64) beside exact zeros (padding), costs
whose entries span many orders of magnitude (and signs) at an overall scale from 1e-30 to 1e30 with eps
in proportion, and non-contiguous, strided and expanded layouts. Every backend must give finite outputs,
the float64 torch reference's plan and potentials (computed from the same rounded inputs) within the
contract's bound, and leave its inputs untouched.

Bounds (docs/precision.md): float32, float16 and bfloat16 all compute in float32 (a half input is
widened exactly), so all three get docs/contract.md section 5's float32 bound, ``max |plan diff| <= 1e-5 * max plan
entry``; float64 gets 1e-10. Potentials: float32 rounds a log potential of magnitude ``L`` to
``L * 6e-8``, so ``|f - f_ref| <= 2e-5 * eps * (1 + max |f_ref| / eps)`` (the log of a 1e-38 weight is 87).

The default run draws a few derandomized examples per backend and dtype; ``pytest -m slow`` runs the
same properties with a large budget.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, SINKHORN_BACKENDS, assert_finite, has_float64, interpreted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aplot_kernels import sinkhorn

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
PLAN_BOUND = {torch.float64: 1e-10}  # else the float32 bound
POTENTIAL_BOUND = {torch.float64: 1e-10}


def _settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@st.composite
def adversarial(draw, dtype, max_size, max_iters):
    """``(C, a, b, eps, n_iters)``: ``C`` in ``dtype`` (maybe a strided or expanded view), weights in
    the compute dtype (``[B, K]``, or ``[K]`` broadcast to every problem)."""
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    batch, n, m = draw(st.integers(1, 3)), draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    # Costs: entries u * 10^-e with e up to `spread` decades, some negative, at an overall scale; eps in
    # proportion to the largest entry (max |C| / eps <= 100: float32 resolves -C / eps to 1e-5).
    info = torch.finfo(dtype)
    scales = [1.0, 1e-3, 1e3] + ([1e-30, 1e30] if info.max > 1e30 else [])
    scale = draw(st.sampled_from(scales))
    spread = draw(st.sampled_from([0, 3, 12]))
    C = torch.rand(batch, n, m, generator=g, dtype=torch.float64)
    C = C * 10.0 ** (-spread * torch.rand(batch, n, m, generator=g, dtype=torch.float64))
    if draw(st.booleans()):
        C = C - 0.5 * C.mean()
    C = (scale * C).to(dtype)
    largest = float(C.double().abs().max())
    eps = max(largest * draw(st.sampled_from([0.01, 0.05, 0.3, 2.0])), torch.finfo(weight_dtype).tiny)

    floor = 300 if dtype == torch.float64 else 38
    mass = draw(st.sampled_from([1.0, 0.01, 50.0]))

    def weights(size):
        kind = torch.randint(0, 4, (batch, size), generator=g)  # 0: padding, 1: tiny, 2-3: ordinary
        if not draw(st.booleans()):
            kind = torch.where(kind == 0, 2, kind)  # no padding in this marginal
        tiny = 10.0 ** (-floor * torch.rand(batch, size, generator=g, dtype=torch.float64))
        w = torch.where(kind == 1, tiny, torch.rand(batch, size, generator=g, dtype=torch.float64) + 0.1)
        w = torch.where(kind == 0, 0.0, w)
        w[:, 0] = torch.where(w[:, 0] < 1e-3, 0.7, w[:, 0])  # an ordinary weight in every problem
        return w

    a, b = weights(n), weights(m)
    a = mass * a / a.sum(-1, keepdim=True)
    b = mass * b / b.sum(-1, keepdim=True)
    a, b = a.to(weight_dtype), b.to(weight_dtype)

    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
    if layout == "transposed":
        C = C.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided":
        wide = torch.zeros(batch, n, 2 * m, dtype=dtype)
        wide[..., ::2] = C
        C = wide[..., ::2]
    elif layout == "expanded":  # one problem repeated, its weights given once
        C, a, b = C[:1].expand(batch, n, m), a[0], b[0]
    n_iters = draw(st.integers(1, max_iters))
    return C.to(DEVICE), a.to(DEVICE), b.to(DEVICE), eps, n_iters


def _check(backend, dtype, problem):
    C, a, b, eps, n_iters = problem
    inputs = [(t, t.clone(), t.stride()) for t in (C, a, b)]
    r = sinkhorn(C, a, b, eps=eps, n_iters=n_iters, backend=backend)
    ref = sinkhorn(C.double(), a.double(), b.double(), eps=eps, n_iters=n_iters, backend="torch")
    for t, before, stride in inputs:
        assert torch.equal(t, before) and t.stride() == stride, "an input was modified"
    assert_finite(**r._asdict())
    assert r.plan.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    plan, want = r.plan.double(), ref.plan
    bound = PLAN_BOUND.get(dtype, 1e-5)
    for k in range(plan.shape[0]):
        diff = float((plan[k] - want[k]).abs().max())
        assert diff <= bound * float(want[k].max()), f"problem {k}: plan diff {diff:.3e}, max {float(want[k].max()):.3e}"
    potential_bound = POTENTIAL_BOUND.get(dtype, 2e-5)
    for name in ("f", "g"):
        got, expected = getattr(r, name).double(), getattr(ref, name)
        allowed = potential_bound * (eps + float(expected.abs().max()))
        assert float((got - expected).abs().max()) <= allowed, name
    weights_a = a.expand(C.shape[:2]) if a.dim() == 1 else a
    assert bool((r.plan[weights_a == 0] == 0).all()), "padding received mass"


def _cases():
    for backend in SINKHORN_BACKENDS:
        for dtype in DTYPES:
            if dtype == torch.float64 and not has_float64(backend):
                continue
            yield pytest.param(backend, dtype, id=f"{backend}-{str(dtype).replace('torch.', '')}")


def _run(backend, dtype, examples):
    tiny = interpreted(backend)

    @_settings(max(2, examples // 4) if tiny else examples)
    @given(problem=adversarial(dtype, max_size=5 if tiny else 24, max_iters=6 if tiny else 30))
    def check(problem):
        _check(backend, dtype, problem)

    check()


@pytest.mark.parametrize("backend, dtype", list(_cases()))
def test_adversarial_inputs(backend, dtype):
    _run(backend, dtype, examples=6)


def _slow_selected(config) -> bool:
    expression = config.getoption("markexpr") or ""
    return "slow" in expression and "not slow" not in expression


@pytest.mark.slow
@pytest.mark.parametrize("backend, dtype", list(_cases()))
def test_adversarial_inputs_large_budget(request, backend, dtype):
    """The same properties with 40x the examples (minutes): run with ``pytest -m slow``."""
    if not _slow_selected(request.config):
        pytest.skip("large example budget: run with -m slow")
    _run(backend, dtype, examples=240)
