"""The APLOT margin on the Triton backend: the fused margin kernel and the two-kernel path.

Against the float64 torch reference on the same (rounded) inputs: the fused
kernel (cost, Sinkhorn and row costs in one program, no cost matrix or plan
written), its scaling-domain loop, its fallback when it cannot launch, and the
path past its size (cost kernel, then the row-cost Sinkhorn). Tolerances per
embedding dtype are in ``MARGIN_TOLERANCE``.
"""

from __future__ import annotations

import pytest
import torch

from triton_cases import DEVICE, TRITON_OK, embeddings, generator

pytestmark = pytest.mark.skipif(not TRITON_OK, reason="Triton unavailable")

if TRITON_OK:
    from aplot_kernels.cost import triton as cost_kernels
    from aplot_kernels.sinkhorn import triton as triton_sinkhorn


def test_margin_through_triton_matches_torch():
    import aplot_kernels

    x, y, rx, ry = (t[0] for t in embeddings(1, 12, 12, 16, torch.float32, seed=29))
    got = aplot_kernels.aplot_margin(rx, ry, x, y, eps=0.05, n_iters=30, backend="triton")
    want = aplot_kernels.aplot_margin(rx.double(), ry.double(), x.double(), y.double(), eps=0.05, n_iters=30, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, m", [(7, 7), (16, 16), (20, 20), (7, 12), (16, 24)])
def test_detached_triton_margin_writes_no_plan(n, m, emb_dtype, monkeypatch):
    import aplot_kernels

    x, y, rx, ry = (t[0] for t in embeddings(1, n, m, 32, emb_dtype, seed=n * m))
    options = dict(alpha=0.8, temperature=0.7, eps=0.05, n_iters=20, scale=1.3)
    with monkeypatch.context() as patch:
        solves = _record_solves(patch)
        got = aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton", **options)
    assert True not in solves, "the detached Triton margin should not run the plan-writing solve"
    # The reference on the same (rounded) inputs, widened to float64.
    want = aplot_kernels.aplot_margin(*(t.double() for t in (rx, ry, x, y)), backend="torch", **options)
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    # The plan-writing path (what APLOTLoss logs) gives the same margins.
    out = aplot_kernels.APLOTLoss(backend="triton", **options)(rx, ry, x, y, return_outputs=True)
    assert out.plan is not None and out.plan.shape == (n, m)
    torch.testing.assert_close(out.margins, got, rtol=1e-6, atol=1e-8)


MARGIN_CASES = [
    # n, m, D, embedding dtype
    (1, 3, 8, torch.float32),
    (7, 7, 33, torch.float32),
    (12, 20, 40, torch.bfloat16),
    (16, 16, 16, torch.float16),
    (5, 17, 24, torch.bfloat16),
]


def _record_solves(patch):
    """Record each Triton Sinkhorn run (``write_plan`` of every call through its one path, ``run``)."""
    calls = []
    real = triton_sinkhorn.run

    def run(*args, write_plan):
        calls.append(write_plan)
        return real(*args, write_plan=write_plan)

    patch.setattr(triton_sinkhorn, "run", run)
    return calls


def _forbid(patch, module, name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"the fused margin should not call {module.__name__}.{name}")

    patch.setattr(module, name, forbidden)


@pytest.mark.parametrize("case", MARGIN_CASES, ids=lambda c: f"{c[0]}x{c[1]}-D{c[2]}-{str(c[3])[6:]}")
def test_fused_margin_kernel_matches_reference(case, monkeypatch):
    """Cost, Sinkhorn and row costs in one kernel: no cost kernel, no solve, no C or P written."""
    import aplot_kernels

    n, m, d, dtype = case
    x, y, rx, ry = (t[0] for t in embeddings(1, n, m, d, dtype, seed=7 * n + m + d))
    x = x.t().contiguous().t()  # column-major: the kernel takes any strides
    options = dict(alpha=0.8, temperature=0.7, eps=0.05, n_iters=20, scale=1.3)
    inputs = [t.clone() for t in (rx, ry, x, y)]
    with monkeypatch.context() as patch:
        _forbid(patch, cost_kernels, "aplot_cost")
        solves = _record_solves(patch)
        got = aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton", **options)
        loss = aplot_kernels.aplot_loss(rx, ry, x, y, backend="triton", reduction="none", **options)
    assert solves == [], "the fused margin runs no separate Sinkhorn"
    for before, after in zip(inputs, (rx, ry, x, y)):
        assert torch.equal(before, after), "inputs are left untouched"
    # The reference on the same (rounded) inputs, widened to float64.
    want = aplot_kernels.aplot_margin(*(t.double() for t in (rx, ry, x, y)), backend="torch", **options)
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)
    # The loss subtracts the float32 margin from the reward gap taken in the rewards' dtype.
    want_loss = aplot_kernels.bt_loss(rx, ry[:n], want.float(), reduction="none")
    torch.testing.assert_close(loss, want_loss, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("case", MARGIN_CASES[1:4], ids=lambda c: f"{c[0]}x{c[1]}-D{c[2]}-{str(c[3])[6:]}")
def test_fused_margin_kernel_in_scaling_domain(case):
    """The margin kernel with the scaling-domain loop (recomputing the cost on a fallback) matches the reference."""
    import aplot_kernels
    from aplot_kernels.margin import triton as loss_triton

    n, m, d, dtype = case
    x, y, rx, ry = (t[0] for t in embeddings(1, n, m, d, dtype, seed=3 * n + m + d))
    got = loss_triton.aplot_margin(rx, ry, x, y, 0.8, 0.7, 1e-8, 0.05, 20, 1.3, scaling=True)
    want = aplot_kernels.aplot_margin(
        *(t.double() for t in (rx, ry, x, y)), alpha=0.8, temperature=0.7, eps=0.05, n_iters=20, scale=1.3, backend="torch"
    )
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("scaling", [False, True])
def test_fused_margin_with_underflowing_column(scaling):
    """A rejected response every chosen one nearly equals, with tied rewards: its cost column is about
    1 - alpha / 2 = 0.95 throughout, exp(-C / eps) underflows at eps = 0.01, and the scaling-domain loop
    must fall back to log-domain iterations (recomputing the cost tile from the embeddings)."""
    import aplot_kernels
    from aplot_kernels.margin import triton as loss_triton

    gen = generator(73)
    n, m, d = 11, 14, 24
    anchor = torch.randn(d, generator=gen)
    x = anchor + 0.01 * torch.randn(n, d, generator=gen)
    y = torch.randn(m, d, generator=gen)
    y[-1] = anchor
    rx = torch.zeros(n)
    ry = torch.randn(m, generator=gen)
    ry[-1] = 0.0
    x, y, rx, ry = (t.to(DEVICE) for t in (x, y, rx, ry))
    options = dict(alpha=0.1, temperature=1.0, eps=0.01, n_iters=25, scale=1.0)
    want = aplot_kernels.aplot_margin(*(t.double() for t in (rx, ry, x, y)), backend="torch", **options)
    cost = aplot_kernels.aplot_cost(x.double(), y.double(), rx.double(), ry.double(), alpha=0.1)
    assert cost[:, -1].min().item() / 0.01 > 87.4, "the last column's kernel entries are below 2**-126"
    got = loss_triton.aplot_margin(rx, ry, x, y, 0.1, 1.0, 1e-8, 0.01, 25, 1.0, scaling=scaling)
    torch.testing.assert_close(got.double(), want, rtol=5e-6, atol=1e-7)


@pytest.mark.parametrize("scaling", [False, True])
@pytest.mark.parametrize(
    "n, m, d, dtype", [(128, 128, 64, torch.bfloat16), (100, 113, 72, torch.float32)], ids=["128x128-bf16", "100x113-fp32"]
)
def test_fused_margin_kernel_at_its_largest_size(n, m, d, dtype, scaling):
    """The sizes a training step uses (up to 128 pairs on a side), with the default 50 iterations."""
    import aplot_kernels
    from aplot_kernels.margin import triton as loss_triton

    x, y, rx, ry = (t[0] for t in embeddings(1, n, m, d, dtype, seed=n + m + d))
    assert loss_triton.fits(n, m)
    got = loss_triton.aplot_margin(rx, ry, x, y, 0.9, 1.0, 1e-8, 0.1, 50, 1.0, scaling=scaling)
    want = aplot_kernels.aplot_margin(*(t.double() for t in (rx, ry, x, y)), backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)


def test_fused_margin_only_where_it_fits(monkeypatch):
    """Past the fused size the margin takes the cost kernel and the row-cost Sinkhorn, with the same numbers."""
    import aplot_kernels
    from aplot_kernels.margin import triton as loss_triton

    x, y, rx, ry = (t[0] for t in embeddings(1, 20, 24, 16, torch.float32, seed=41))
    options = dict(eps=0.08, n_iters=15, backend="triton")
    fused = aplot_kernels.aplot_margin(rx, ry, x, y, **options)
    assert loss_triton.fits(20, 24) and loss_triton.fits(128, 128) and not loss_triton.fits(129, 128)
    assert not loss_triton.fits(8, 1024), "long operand tiles would not fit in shared memory"
    monkeypatch.setattr(loss_triton, "fits", lambda n, m: False)
    solves = _record_solves(monkeypatch)
    unfused = aplot_kernels.aplot_margin(rx, ry, x, y, **options)
    assert solves == [False], "the large-problem path reduces rows in the Sinkhorn kernel"
    torch.testing.assert_close(fused, unfused, rtol=2e-6, atol=1e-8)
    with pytest.raises(ValueError, match="fused margin"):
        loss_triton.aplot_margin(rx, ry, x, y, 0.9, 1.0, 1e-8, 0.1, 5, 1.0)


def test_fused_margin_falls_back_when_it_cannot_launch(monkeypatch):
    """A GPU the fused kernel cannot run on (out of shared memory or registers, a ptxas error) gets
    the two-kernel margin, with one warning, instead of an exception in the training step."""
    import triton

    import aplot_kernels
    from aplot_kernels.margin import triton as loss_triton

    monkeypatch.setattr(loss_triton, "_unavailable_reason", None)
    launches = []

    def refuse(*args, **kwargs):
        launches.append(1)
        raise triton.OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(loss_triton, "_aplot_margin_kernel", type("Refuses", (), {"__getitem__": lambda self, grid: refuse})())
    x, y, rx, ry = (t[0] for t in embeddings(1, 11, 13, 16, torch.float32, seed=43))
    options = dict(eps=0.08, n_iters=15)
    with pytest.warns(RuntimeWarning, match="fused Triton margin kernel could not run"):
        first = aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton", **options)
    second = aplot_kernels.aplot_loss(rx, ry, x, y, backend="triton", reduction="none", **options)
    assert launches == [1] and not loss_triton.available()  # tried once, then not again
    want = aplot_kernels.aplot_margin(rx.double(), ry.double(), x.double(), y.double(), backend="torch", **options)
    torch.testing.assert_close(first.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        second.double(), -torch.nn.functional.logsigmoid((rx - ry[:11]).double() - want), rtol=1e-5, atol=1e-6
    )


def test_fused_margin_call_runs_its_checks_and_one_kernel(monkeypatch):
    """Everything a fused-margin call launches besides its kernel: the checks' one reduction of the
    concatenated inputs (read back once) and the registered op (its output buffer and kernel). On a GPU each further op would be a launch
    of several microseconds, against a kernel of tens of microseconds at training sizes."""
    import aplot_kernels
    from conftest import DeviceOps

    from aplot_kernels.margin import triton as loss_triton

    from aplot_kernels import _checks

    monkeypatch.setattr(_checks, "_cpu_finite_op", lambda: None)  # the checks as on GPU tensors (no extension op)
    launches = []
    monkeypatch.setattr(
        loss_triton,
        "_aplot_margin_kernel",
        type("Records", (), {"__getitem__": lambda self, grid: lambda *args, **kwargs: launches.append(grid)})(),
    )
    x, y, rx, ry = (t[0] for t in embeddings(1, 11, 13, 16, torch.bfloat16, seed=47))
    aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton")  # a training step repeats the same call
    with DeviceOps() as recorded:
        aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton")
    # The checks: one concatenation of the four small inputs, one reduction, one read-back; then the
    # registered op, whose output buffer and one kernel (counted below) the recorder does not see.
    assert recorded.ops == ["aten.cat", "aten.sum", "aten._local_scalar_dense", "aplot_kernels.triton_aplot_margin"]
    assert launches == [(1,), (1,)]


def test_cost_call_launches_one_norm_pass_and_one_cost_kernel(monkeypatch):
    """The row norms of both inputs are one launch; with the cost kernel and the checks' reduction,
    that is all an ``aplot_cost`` call runs on the device."""
    import aplot_kernels
    from conftest import DeviceOps

    launches = []
    names = {id(getattr(cost_kernels, name)): name for name in ("_row_norms_kernel", "_cosine_cost_kernel", "_aplot_cost_kernel")}

    def recording_wrap_triton(kernel):  # every launch goes through wrap_triton (the op is a triton_op)
        return type("Records", (), {"__getitem__": lambda self, grid: lambda *a, **k: launches.append(names[id(kernel)])})()

    monkeypatch.setattr(cost_kernels, "wrap_triton", recording_wrap_triton)
    monkeypatch.setattr(aplot_kernels._checks, "_cpu_finite_op", lambda: None)  # the checks as on GPU tensors
    x, y, rx, ry = embeddings(2, 11, 13, 16, torch.bfloat16, seed=53)
    with DeviceOps() as recorded:
        aplot_kernels.aplot_cost(x, y, rx, ry, backend="triton")
    assert launches == ["_row_norms_kernel", "_aplot_cost_kernel"]
    checks = ["aten.cat", "aten.sum", "aten._local_scalar_dense"]
    assert [op for op in recorded.ops if op not in ("aten.slice", "aten.empty")] == checks + ["aplot_kernels.triton_aplot_cost"]


def test_loss_forms_plan_only_when_returned(monkeypatch):
    """The loss alone (and margins for logging) never run the plan-writing solve; the outputs do."""
    import aplot_kernels

    x, y, rx, ry = (t[0] for t in embeddings(1, 9, 9, 16, torch.float32, seed=43))
    module = aplot_kernels.APLOTLoss(backend="triton", eps=0.07, n_iters=12)
    with_plan = module(rx, ry, x, y, return_outputs=True)
    assert with_plan.plan is not None and with_plan.cost is not None
    with monkeypatch.context() as patch:
        solves = _record_solves(patch)
        loss = module(rx, ry, x, y)
        margins_only = module(rx, ry, x, y, return_outputs=True, with_plan=False)
        functional = aplot_kernels.aplot_loss(rx, ry, x, y, backend="triton", eps=0.07, n_iters=12)
    assert True not in solves, "no plan-writing solve"
    assert margins_only.plan is None and margins_only.cost is None
    torch.testing.assert_close(margins_only.margins, with_plan.margins, rtol=2e-6, atol=1e-8)
    for value in (loss, margins_only.loss, functional):
        torch.testing.assert_close(value, with_plan.loss, rtol=2e-6, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_aplot_loss_captures_in_a_cuda_graph():
    """A training step's loss (fused margin kernel, value checks skipped while capturing) replays as a CUDA graph."""
    import aplot_kernels

    x, y, rx, ry = (t[0] for t in embeddings(1, 24, 24, 64, torch.bfloat16, seed=79))
    options = dict(backend="triton", eps=0.1, n_iters=30)
    eager = aplot_kernels.aplot_loss(rx, ry, x, y, **options)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernel) outside the capture
        aplot_kernels.aplot_loss(rx, ry, x, y, **options)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = aplot_kernels.aplot_loss(rx, ry, x, y, **options)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
