"""The reward-model losses (docs/contract.md section 3): ``bt_loss``, ``aplot_margin``, ``aplot_loss``, ``APLOTLoss``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import COST_BACKENDS, DEVICE, SINKHORN_BACKENDS, assert_finite, random_embeddings, small

from aplot_kernels import APLOTLoss, aplot_cost, aplot_loss, aplot_margin, bt_loss, sinkhorn
from aplot_kernels import loss as loss_module

LOSS_BACKENDS = [b for b in SINKHORN_BACKENDS if b in COST_BACKENDS]


def opts(backend, **options):
    """``backend=`` plus a short Sinkhorn run on the Triton interpreter (the default 50 iterations elsewhere)."""
    return {"backend": backend, "n_iters": small(backend, 50, 12), **options}


@pytest.fixture(params=LOSS_BACKENDS)
def loss_backend(request):
    return request.param


def _batch(gen, n, m=None, d=16, dtype=torch.float32):
    m = n if m is None else m
    return (
        random_embeddings(gen, n, dtype=dtype),
        random_embeddings(gen, m, dtype=dtype),
        random_embeddings(gen, n, d, dtype=dtype),
        random_embeddings(gen, m, d, dtype=dtype),
    )


def test_bt_loss_is_negative_log_sigmoid(gen):
    rc, rr, _, _ = _batch(gen, 6, dtype=torch.float64)
    margin = random_embeddings(gen, 6)
    torch.testing.assert_close(bt_loss(rc, rr, reduction="none"), -F.logsigmoid(rc - rr))
    torch.testing.assert_close(bt_loss(rc, rr, margin, reduction="none"), -F.logsigmoid(rc - rr - margin))
    torch.testing.assert_close(bt_loss(rc, rr, 0.3, reduction="sum"), -F.logsigmoid(rc - rr - 0.3).sum())
    torch.testing.assert_close(bt_loss(rc, rr), -F.logsigmoid(rc - rr).mean())


def test_scale_zero_is_bt_loss_exactly(loss_backend, gen):
    rc, rr, ce, re = _batch(gen, 5)
    margin = random_embeddings(gen, 5, dtype=torch.float32)
    for reduction in ("mean", "sum", "none"):
        got = aplot_loss(rc, rr, ce, re, reduction=reduction, scale=0.0, **opts(loss_backend))
        assert torch.equal(got, bt_loss(rc, rr, reduction=reduction))
        got = aplot_loss(rc, rr, ce, re, margin, reduction=reduction, scale=0, **opts(loss_backend))
        assert torch.equal(got, bt_loss(rc, rr, margin, reduction=reduction))


def test_margin_is_scaled_average_transport_cost(loss_backend, gen):
    rc, rr, ce, re = _batch(gen, 6, m=9)
    options = dict(alpha=0.7, temperature=0.5, eps=0.2, n_iters=30)
    got = aplot_margin(rc, rr, ce, re, scale=1.7, **opts(loss_backend, **options))
    cost = aplot_cost(ce, re, rc, rr, alpha=0.7, temperature=0.5, backend="torch")
    plan = sinkhorn(cost, eps=0.2, n_iters=30, backend="torch").plan
    assert got.shape == (6,)
    torch.testing.assert_close(got, 1.7 * 6 * (plan * cost).sum(-1), rtol=1e-5, atol=1e-6)


def test_hard_pair_gets_larger_margin(loss_backend, gen):
    """Pair 0: near-duplicate responses with equal rewards. The others: distant responses, large reward gaps."""
    n, d = 6, 16
    ce = random_embeddings(gen, n, d, dtype=torch.float32)
    re = -ce + 0.3 * random_embeddings(gen, n, d, dtype=torch.float32)
    re[0] = ce[0] + 1e-3 * random_embeddings(gen, d, dtype=torch.float32)
    rc = 3.0 + torch.rand(n, generator=gen).to(DEVICE)
    rr = -3.0 - torch.rand(n, generator=gen).to(DEVICE)
    rc[0] = rr[0] = 0.0
    margins = aplot_margin(rc, rr, ce, re, **opts(loss_backend))
    assert int(margins.argmax()) == 0
    assert float(margins[0]) > 1.3 * float(margins[1:].max())
    # A larger margin means a larger loss for the hard pair than bt_loss alone gives it.
    with_ot = aplot_loss(rc, rr, ce, re, reduction="none", **opts(loss_backend))
    assert float(with_ot[0]) > float(bt_loss(rc, rr, reduction="none")[0])


def test_single_pair_falls_back_with_one_warning(loss_backend, gen, monkeypatch):
    monkeypatch.setattr(loss_module, "_warned_single_pair", False)
    rc, rr, ce, re = _batch(gen, 1)
    with pytest.warns(RuntimeWarning, match="single pair"):
        got = aplot_loss(rc, rr, ce, re, **opts(loss_backend))
    assert torch.equal(got, bt_loss(rc, rr))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(APLOTLoss(**opts(loss_backend))(rc, rr, ce, re), bt_loss(rc, rr))


def test_one_chosen_against_several_rejected_uses_ot(loss_backend, gen):
    """n = 1 with m > 1 rejected responses is a real transport problem: no fallback."""
    rc, rr, ce, re = _batch(gen, 1, m=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = APLOTLoss(**opts(loss_backend))(rc, rr, ce, re, return_outputs=True)
    assert out.plan.shape == (1, 4) and out.margins.shape == (1,)


def test_more_rejected_than_chosen(loss_backend, gen):
    rc, rr, ce, re = _batch(gen, 4, m=7)
    out = APLOTLoss(**opts(loss_backend), scale=0.5)(rc, rr, ce, re, return_outputs=True)
    assert out.plan.shape == (4, 7) and out.cost.shape == (4, 7) and out.margins.shape == (4,)
    torch.testing.assert_close(out.plan.sum(-1), torch.full((4,), 0.25, device=DEVICE), rtol=0, atol=1e-3)
    # Only the first n rejected responses pair up with the chosen ones.
    torch.testing.assert_close(out.loss, bt_loss(rc, rr[:4], out.margins))


@pytest.mark.parametrize("detach", [True, False])
def test_gradients_reach_rewards_and_embeddings_only_when_attached(loss_backend, gen, detach):
    inputs = [t.requires_grad_() for t in _batch(gen, 5, m=6)]
    aplot_loss(*inputs, detach=detach, **opts(loss_backend)).backward()
    rc, rr, ce, re = inputs
    assert_finite(grad_rc=rc.grad, grad_rr=rr.grad)
    assert float(rc.grad.abs().sum()) > 0
    if detach:
        assert ce.grad is None and re.grad is None
        # Detached margins: the reward gradient is bt_loss's with the margin held fixed.
        margin = aplot_margin(*(t.detach() for t in inputs), **opts(loss_backend))
        rc2, rr2 = rc.detach().clone().requires_grad_(), rr.detach().clone().requires_grad_()
        bt_loss(rc2, rr2[:5], margin).backward()
        torch.testing.assert_close(rc.grad, rc2.grad)
    else:
        assert_finite(grad_ce=ce.grad, grad_re=re.grad)
        assert float(ce.grad.abs().sum()) > 0 and float(re.grad.abs().sum()) > 0


def test_attached_margin_gradient_matches_finite_differences(gen):
    rc, rr, ce, re = (t.double() for t in _batch(gen, 4, m=5, d=6))
    inputs = [t.clone().requires_grad_() for t in (rc, rr, ce, re)]
    options = dict(eps=0.2, n_iters=400, detach=False, backend="torch")
    weights = torch.randn(4, generator=gen, dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((aplot_margin(*inputs, **options) * weights).sum(), inputs)
    step = 1e-6
    for k, (x, g) in enumerate(zip((rc, rr, ce, re), grads)):
        d = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE)
        args = [rc, rr, ce, re]
        args[k] = x + step * d
        plus = (aplot_margin(*args, **options) * weights).sum()
        args[k] = x - step * d
        minus = (aplot_margin(*args, **options) * weights).sum()
        measured = float((plus - minus) / (2 * step))
        assert abs(float((g * d).sum()) - measured) <= 1e-5 * max(1.0, abs(measured)), k


def test_reductions(loss_backend, gen):
    rc, rr, ce, re = _batch(gen, 5)
    none = aplot_loss(rc, rr, ce, re, reduction="none", **opts(loss_backend))
    assert none.shape == (5,)
    torch.testing.assert_close(aplot_loss(rc, rr, ce, re, reduction="sum", **opts(loss_backend)), none.sum())
    torch.testing.assert_close(aplot_loss(rc, rr, ce, re, **opts(loss_backend)), none.mean())


def test_dataset_margin_is_added(loss_backend, gen):
    rc, rr, ce, re = _batch(gen, 5)
    dataset_margin = torch.rand(5, generator=gen).to(DEVICE)
    ot_margin = aplot_margin(rc, rr, ce, re, **opts(loss_backend))
    got = aplot_loss(rc, rr, ce, re, dataset_margin, reduction="none", **opts(loss_backend))
    torch.testing.assert_close(got, bt_loss(rc, rr, ot_margin + dataset_margin, reduction="none"))
    got = aplot_loss(rc, rr, ce, re, 0.25, reduction="none", **opts(loss_backend))
    torch.testing.assert_close(got, bt_loss(rc, rr, ot_margin + 0.25, reduction="none"))


def test_module_forward_equals_function(loss_backend, gen):
    rc, rr, ce, re = _batch(gen, 6)
    options = dict(alpha=0.8, temperature=0.7, eps=0.15, n_iters=25, scale=0.6)
    module = APLOTLoss(reduction="sum", **opts(loss_backend, **options))
    expected = aplot_loss(rc, rr, ce, re, reduction="sum", **opts(loss_backend, **options))
    assert torch.equal(module(rc, rr, ce, re), expected)
    out = module(rc, rr, ce, re, return_outputs=True)
    assert torch.equal(out.loss, expected)
    torch.testing.assert_close(out.margins, aplot_margin(rc, rr, ce, re, **opts(loss_backend, **options)))
    torch.testing.assert_close(out.cost, aplot_cost(ce, re, rc, rr, alpha=0.8, temperature=0.7, backend=loss_backend))
    torch.testing.assert_close(out.plan, sinkhorn(out.cost, eps=0.15, n_iters=25, backend=loss_backend).plan)
    skipped = APLOTLoss(scale=0.0, **opts(loss_backend))(rc, rr, ce, re, return_outputs=True)
    assert skipped.margins is None and skipped.plan is None and skipped.cost is None


def test_half_precision_inputs(loss_backend, gen):
    rc, rr, ce, re = (t.to(torch.bfloat16) for t in _batch(gen, 4))
    got = aplot_loss(rc, rr, ce, re, reduction="none", **opts(loss_backend))
    assert_finite(loss=got.float())
    reference = aplot_loss(*(t.float() for t in (rc, rr, ce, re)), reduction="none", **opts(loss_backend))
    torch.testing.assert_close(got.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("detach", [True, False])
def test_loss_in_a_compiled_step(loss_backend, detach, gen):
    """A trainer that wraps its step in ``torch.compile`` gets the eager loss and gradients
    (the ops run between compiled regions where they cannot be traced)."""
    rc, rr, ce, re = _batch(gen, 7, m=7)
    inputs = [t.requires_grad_() for t in (rc, rr, ce, re)]

    def step(*args):
        return APLOTLoss(detach=detach, **opts(loss_backend, eps=0.2))(*args)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, inputs, allow_unused=True)
    want = step(*inputs)
    want_grads = torch.autograd.grad(want, inputs, allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert (got_grads[2] is None) == detach  # a detached margin sends nothing to the embeddings


@pytest.mark.parametrize("detach", [True, False])
def test_autocast_region_changes_nothing(loss_backend, detach, gen):
    """Called inside ``torch.autocast`` (as in a mixed-precision step), the loss, the cost and their
    gradients are those of the same half-precision inputs outside it: autocast must not recast the
    ops' own float32 steps (the reference's product ran in bfloat16; the extension's failed)."""
    rc, rr, ce, re = (t.to(torch.bfloat16) for t in _batch(gen, 9, m=9))

    def run(autocast):
        inputs = [t.clone().requires_grad_() for t in (rc, rr, ce, re)]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            loss = APLOTLoss(detach=detach, **opts(loss_backend, eps=0.2))(*inputs)
            cost = aplot_cost(*inputs[2:], *inputs[:2], backend=loss_backend)
        grads = torch.autograd.grad(loss + cost.sum(), inputs)
        return loss, cost, grads

    loss, cost, grads = run(autocast=True)
    want_loss, want_cost, want_grads = run(autocast=False)
    assert loss.dtype == torch.float32 and cost.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(cost, want_cost, rtol=0, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rewards_are_subtracted_in_float32(loss_backend, dtype, gen):
    """Rewards of ~1e3 in bfloat16: ``r_c - r_r`` rounded to bfloat16 would be off by up to 4;
    the losses take the difference in float32 and return float32."""
    rc, rr, ce, re = _batch(gen, 8)
    rc, rr = (rc * 700).to(dtype), (rr * 700).to(dtype)
    exact = -F.logsigmoid(rc.double() - rr.double())
    got = bt_loss(rc, rr, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6)
    with_ot = aplot_loss(rc, rr, ce, re, reduction="none", **opts(loss_backend))
    margins = aplot_margin(rc, rr, ce, re, **opts(loss_backend))
    assert with_ot.dtype == torch.float32
    torch.testing.assert_close(
        with_ot.double(), -F.logsigmoid(rc.double() - rr.double() - margins.double()), rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif("triton" not in LOSS_BACKENDS, reason="Triton cannot run here")
def test_fused_margin_scaling_loop_is_chosen_by_argument_only(monkeypatch, gen):
    """The environment does not switch the fused margin kernel's Sinkhorn loop; ``scaling=True`` does,
    with the margins of the log-domain loop."""
    from aplot_kernels.margin import triton as loss_triton

    seen = []
    real = loss_triton._aplot_margin_kernel
    monkeypatch.setattr(
        loss_triton,
        "_aplot_margin_kernel",
        type(
            "Spy",
            (),
            {
                "__getitem__": lambda self, grid: lambda *a, **k: (seen.append(k["SCALING"]), real[grid](*a, **k)),
            },
        )(),
    )
    monkeypatch.setenv("APLOT_KERNELS_TRITON_SCALING", "1")
    rc, rr, ce, re = _batch(gen, 6)
    plain = aplot_margin(rc, rr, ce, re, backend="triton", n_iters=10)
    scaled = loss_triton.aplot_margin(rc, rr, ce, re, 0.9, 1.0, 1e-8, 0.1, 10, 1.0, scaling=True)
    assert seen == [False, True]
    torch.testing.assert_close(scaled, plain, rtol=2e-6, atol=1e-8)
