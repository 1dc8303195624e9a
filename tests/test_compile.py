"""``torch.compile(fullgraph=True)`` of every public op: the eager values and gradients, no graph break.

The broad table (every op, grad mode and CPU backend) compiles with the
``aot_eager`` backend, which traces exactly what Inductor traces (dynamo, then
AOT autograd with the ops' fake kernels and backward formulas) without
generating code; a few representative cases run through Inductor itself, the
full Inductor sweep is in the slow run. The check policy (README, "torch.compile
and CUDA graphs") is tested on both sides: eager calls raise on bad values,
compiled calls never read values back (a read would break the graph).
"""

from __future__ import annotations

import pytest
import torch

import aplot_kernels as ak
from aplot_kernels.sinkhorn import sinkhorn

from conftest import COST_BACKENDS

BACKENDS = [b for b in COST_BACKENDS if b in ("torch", "native")]  # float64 backends
N, M, D = 5, 7, 6  # not powers of two


def _inputs(seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N, D, generator=gen, dtype=dtype), torch.randn(M, D, generator=gen, dtype=dtype)
    rc, rr = torch.randn(N, generator=gen, dtype=dtype), torch.randn(M, generator=gen, dtype=dtype)
    return x, y, rc, rr


def _cases(backend: str) -> dict:
    """name -> f(x, y, rc, rr) returning a scalar that depends on every differentiable input."""
    b = dict(backend=backend)

    def ot(**options):
        def run(x, y, rc, rr):
            C = ak.cosine_cost(x, y, **b)
            a = torch.softmax(rc, 0)  # non-uniform, differentiable marginals of equal mass
            w = torch.softmax(rr, 0)
            r = sinkhorn(C, a, w, eps=0.2, n_iters=30, **options, **b)
            return r.reg_cost + (r.cost + r.plan.square().sum() if options.get("grad") == "implicit" else 0)

        return run

    return {
        "cosine_cost": lambda x, y, rc, rr: ak.cosine_cost(x, y, **b).square().sum(),
        "cosine_cost_self": lambda x, y, rc, rr: ak.cosine_cost(x, **b).square().sum(),
        "aplot_cost": lambda x, y, rc, rr: ak.aplot_cost(x, y, rc, rr, alpha=0.7, **b).square().sum(),
        "aplot_cost_cosine": lambda x, y, rc, rr: ak.aplot_cost(x, y, rc, rr, similarity="cosine", **b).sum(),
        "sinkhorn_envelope": ot(),
        "sinkhorn_envelope_tol": ot(tol=1e-6, check_every=3),
        "sinkhorn_implicit": ot(grad="implicit"),
        "sinkhorn_implicit_tol": ot(grad="implicit", tol=1e-6),
        "sinkhorn_none": lambda x, y, rc, rr: sinkhorn(ak.cosine_cost(x, y, **b), grad="none", **b).cost + x.sum(),
        "margin_detached": lambda x, y, rc, rr: (ak.aplot_margin(rc, rr, x, y, **b) * rc).sum(),
        "margin_attached": lambda x, y, rc, rr: ak.aplot_margin(rc, rr, x, y, detach=False, **b).square().sum(),
        "loss_detached": lambda x, y, rc, rr: ak.aplot_loss(rc, rr, x, y, eps=0.2, **b),
        "loss_attached": lambda x, y, rc, rr: ak.aplot_loss(rc, rr, x, y, detach=False, reduction="sum", **b),
        "loss_module": lambda x, y, rc, rr: ak.APLOTLoss(detach=False, n_iters=20, **b)(rc, rr, x, y),
        "bt_loss": lambda x, y, rc, rr: ak.bt_loss(rc, rr[:N], margin=0.1) + x.sum() + y.sum(),
    }


def _compare(fn, compiler: str, seed: int = 0, rtol: float = 1e-7, atol: float = 1e-9, dtype=torch.float64):
    def run(f):
        inputs = [t.requires_grad_() for t in _inputs(seed, dtype)]
        value = f(*inputs)
        return value, torch.autograd.grad(value, inputs, allow_unused=True)

    want, want_grads = run(fn)
    torch._dynamo.reset()
    got, got_grads = run(torch.compile(fn, fullgraph=True, backend=compiler))
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert (g is None) == (w is None), f"input {i}"
        if g is not None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"input {i}: {m}")


# The reference's Sinkhorn loop unrolls into the trace (seconds per case): in the default run, the
# native backend takes the whole table and the reference the cases without iterations, and the
# envelope and implicit modes, whose operators are one opaque node each.
TORCH_FAST = (
    "cosine_cost",
    "cosine_cost_self",
    "aplot_cost",
    "aplot_cost_cosine",
    "bt_loss",
    "loss_detached",
    "sinkhorn_envelope",
    "sinkhorn_implicit",
)
TABLE = [
    pytest.param(backend, case, marks=() if backend == "native" or case in TORCH_FAST else pytest.mark.slow)
    for backend in BACKENDS
    for case in _cases(backend)
]


def _slow_unless_native(backends):
    return [pytest.param(b, marks=() if b == "native" else pytest.mark.slow) for b in backends]


@pytest.mark.parametrize("backend,case", TABLE)
def test_fullgraph_matches_eager(backend, case):
    _compare(_cases(backend)[case], "aot_eager", seed=len(case))


# Triton (float32; under the interpreter on the CPU, seconds per case): its registered ops in the graph.
TRITON_FAST = ("aplot_cost", "loss_detached")


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=() if case in TRITON_FAST else pytest.mark.slow) for case in _cases("triton")]
)
def test_fullgraph_matches_eager_triton(case):
    if "triton" not in COST_BACKENDS:
        pytest.skip("Triton cannot run here")
    _compare(_cases("triton")[case], "aot_eager", seed=len(case), rtol=1e-5, atol=1e-6, dtype=torch.float32)


INDUCTOR_CASES = [("native", "loss_detached"), ("torch", "aplot_cost")]


@pytest.mark.parametrize("backend,case", INDUCTOR_CASES)
def test_fullgraph_inductor(backend, case):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} unavailable")
    _compare(_cases(backend)[case], "inductor", rtol=1e-6, atol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_cases("torch")))
def test_fullgraph_inductor_sweep(backend, case):
    _compare(_cases(backend)[case], "inductor", seed=len(case) + 1, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", _slow_unless_native(BACKENDS))
def test_compiled_module_with_bank_matches_eager(backend):
    """APLOTLoss with a bank: the bank's Python state is replayed by dynamo (a recompile per bank length)."""
    eager, compiled_module = (ak.APLOTLoss(bank_size=2, detach=False, n_iters=20, backend=backend) for _ in range(2))
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    for step in range(4):  # two full groups: the bank fills and empties
        x, y, rc, rr = _inputs(step)
        want_in = [t.clone().requires_grad_() for t in (rc, rr, x, y)]
        got_in = [t.clone().requires_grad_() for t in (rc, rr, x, y)]
        want, got = eager(*want_in), compiled(*got_in)
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
        for g, w in zip(torch.autograd.grad(got, got_in), torch.autograd.grad(want, want_in)):
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", _slow_unless_native(BACKENDS))
def test_model_step_has_no_graph_break(backend):
    """explain() of "model forward, APLOTLoss, backward": one graph, no break."""
    torch.manual_seed(0)
    embed, head = torch.nn.Linear(8, D).double(), torch.nn.Linear(D, 1).double()
    loss_fn = ak.APLOTLoss(bank_size=1, backend=backend)

    def step(chosen, rejected):
        ec, er = embed(chosen), embed(rejected)
        loss = loss_fn(head(ec).squeeze(-1), head(er).squeeze(-1), ec, er)
        loss.backward()
        return loss.detach()

    gen = torch.Generator().manual_seed(1)
    chosen, rejected = (
        torch.randn(N, 8, generator=gen, dtype=torch.float64),
        torch.randn(N, 8, generator=gen, dtype=torch.float64),
    )
    forward_only = torch._dynamo.explain(
        lambda c, r: loss_fn(head(embed(c)).squeeze(-1), head(embed(r)).squeeze(-1), embed(c), embed(r))
    )(chosen, rejected)
    assert (forward_only.graph_count, forward_only.graph_break_count) == (1, 0), forward_only.break_reasons
    # With the backward in the step, dynamo breaks at `.backward()` itself (a torch limitation, outside
    # aplot_kernels); no break may come from inside the package.
    explained = torch._dynamo.explain(step)(chosen, rejected)
    for reason in explained.break_reasons:
        frames = [frame.filename for frame in reason.user_stack]
        assert not any("aplot_kernels" in f for f in frames), reason


# -- the check policy ----------------------------------------------------------------------------------


def test_value_checks_raise_eagerly_and_are_skipped_when_compiled():
    x, y, rc, rr = _inputs(3)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="chosen_emb"):
        ak.aplot_loss(rc, rr, bad, y, backend="torch")
    compiled = torch.compile(lambda *t: ak.aplot_loss(*t, backend="torch"), fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    # Compiled: no host read, so no value check; the NaN reaches the result, as documented.
    assert torch.isnan(compiled(rc, rr, bad, y))
    assert torch.isfinite(compiled(rc, rr, x, y))


def test_argument_checks_still_raise_when_compiled():
    """Shape, dtype and option checks need no value: they run while tracing. Without fullgraph the call
    raises the eager error; with fullgraph, dynamo reports the same error as the reason it cannot trace."""
    x, y, rc, rr = _inputs(4)
    loss = lambda *t: ak.aplot_loss(*t, backend="torch")  # noqa: E731
    solve = lambda C: sinkhorn(C, eps=-1.0, backend="torch")  # noqa: E731
    unknown = lambda x: ak.cosine_cost(x, backend="nope")  # noqa: E731  (backend resolution raises)
    for fullgraph in (False, True):
        error = ValueError if not fullgraph else Exception
        torch._dynamo.reset()
        with pytest.raises(error, match="`backend`" if not fullgraph else ""):
            torch.compile(unknown, fullgraph=fullgraph, backend="eager")(x)
        error = ValueError if not fullgraph else Exception
        torch._dynamo.reset()
        with pytest.raises(error, match="rejected_rewards"):
            torch.compile(loss, fullgraph=fullgraph, backend="eager")(rc, rr[:3], x, y)
        torch._dynamo.reset()
        with pytest.raises(error, match="eps"):
            torch.compile(solve, fullgraph=fullgraph, backend="eager")(x @ y.T)
