"""``torch.library.opcheck`` of the registered operators ``torch.ops.aplot_kernels.*``.

opcheck runs each op through the schema check (no input mutated, no output
aliased), its fake kernel against the real one, its autograd registration and
AOT autograd's dispatch with dynamic shapes: what ``torch.compile`` relies on.
Inputs are small and not powers of two; the cost ops are checked with and
without inputs that require grad (their backward is the reference's closed form).
"""

from __future__ import annotations

import pytest
import torch

from aplot_kernels import backends

from conftest import COST_BACKENDS, DEVICE

native_only = pytest.mark.skipif("native" not in COST_BACKENDS, reason="the native extension is unavailable")
triton_only = pytest.mark.skipif("triton" not in COST_BACKENDS, reason="Triton cannot run here")


def _ops():
    from aplot_kernels import _native

    return _native.ops()


def _embeddings(gen, b, n, m, d, dtype, requires_grad):
    x = torch.randn(b, n, d, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    y = torch.randn(b, m, d, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    return x, y


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_cost_ops(dtype, requires_grad):
    gen = torch.Generator().manual_seed(0)
    x, y = _embeddings(gen, 2, 5, 7, 6, dtype, requires_grad)
    rc = torch.randn(2, 5, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    rr = torch.randn(2, 7, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    ops = _ops()
    torch.library.opcheck(ops.cosine_cost, (x, y, 1e-8))
    for weight, offset in ((0.05, 1.0), (0.1, 0.0)):  # the "unit" and "cosine" similarities at alpha = 0.9
        torch.library.opcheck(ops.aplot_cost, (x, y, rc, rr, 0.9, 0.7, 1e-8, weight, offset))


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched", [False, True])
def test_fused_margin_op(dtype, batched):
    """``aplot_margins`` (detached, so no autograd formula) for one problem and for a batch."""
    gen = torch.Generator().manual_seed(4)
    x, y = _embeddings(gen, 2, 5, 7, 6, dtype, False)
    rc, rr = torch.randn(2, 5, generator=gen, dtype=dtype), torch.randn(2, 7, generator=gen, dtype=dtype)
    args = (x, y, rc, rr) if batched else (x[0], y[0], rc[0], rr[0])
    torch.library.opcheck(_ops().aplot_margins, (*args, 0.9, 0.7, 1e-8, 0.05, 1.0, 0.2, 15, 1.5))


@native_only
def test_cost_op_half_inputs():
    """Half-precision inputs: a float32 result (the fake kernel must say so too)."""
    gen = torch.Generator().manual_seed(1)
    x, y = _embeddings(gen, 1, 4, 3, 8, torch.bfloat16, False)
    torch.library.opcheck(_ops().cosine_cost, (x, y, 1e-8))


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tol", [-1.0, 1e-6])
def test_sinkhorn_ops(dtype, tol):
    gen = torch.Generator().manual_seed(2)
    C = torch.rand(2, 5, 7, generator=gen, dtype=dtype)
    a = torch.softmax(torch.randn(2, 5, generator=gen, dtype=dtype), -1)
    b = torch.softmax(torch.randn(2, 7, generator=gen, dtype=dtype), -1)
    ops = _ops()
    torch.library.opcheck(ops.sinkhorn_solve, (C, a, b, 0.2, 20, tol, 3))
    torch.library.opcheck(ops.sinkhorn_row_costs, (C, a, b, 0.2, 20, tol, 3))


@native_only
def test_native_resolution_is_a_table_lookup():
    """After the first call the backend comes from the table: no probe of the extension again."""
    cpu = torch.device("cpu")
    first = backends.resolve("native", cpu, torch.float32)
    assert first == "native" and backends._TABLE[("native", "cpu", torch.float32, False)] == "native"


# The Triton backend's ops (aplot_kernels._triton_ops), under the interpreter on the CPU: small shapes. The
# cost ops are opaque there; their traced form: tests/test_triton_ops_traced.py.


def _triton_ops():
    from aplot_kernels import _triton_ops

    return _triton_ops


@triton_only
@pytest.mark.parametrize("requires_grad", [False, True])
def test_triton_cost_ops(requires_grad):
    gen = torch.Generator().manual_seed(3)
    x, y = _embeddings(gen, 1, 5, 7, 16, torch.float32, requires_grad)
    rc = torch.randn(1, 5, generator=gen).requires_grad_(requires_grad)
    rr = torch.randn(1, 7, generator=gen).requires_grad_(requires_grad)
    ops = _triton_ops()
    x, y, rc, rr = (t.to(DEVICE).detach().requires_grad_(requires_grad) for t in (x, y, rc, rr))
    torch.library.opcheck(ops.cosine_cost, (x, y, 1e-8))
    torch.library.opcheck(ops.aplot_cost, (x, y, rc, rr, 0.9, 0.7, 1e-8, 1))


@triton_only
def test_triton_sinkhorn_and_margin_ops():
    gen = torch.Generator().manual_seed(4)
    C = torch.rand(2, 5, 7, generator=gen).to(DEVICE)
    a = torch.softmax(torch.randn(2, 5, generator=gen), -1).to(DEVICE)
    b = torch.softmax(torch.randn(2, 7, generator=gen), -1).to(DEVICE)
    ops = _triton_ops()
    torch.library.opcheck(ops.sinkhorn_solve, (C, a, b, 0.2, 10, None, 1))
    torch.library.opcheck(ops.sinkhorn_solve, (C, a, b, 0.2, 10, 1e-6, 3))
    torch.library.opcheck(ops.sinkhorn_row_costs, (C, a, b, 0.2, 10))
    rc, rr = torch.randn(5, generator=gen).to(DEVICE), torch.randn(7, generator=gen).to(DEVICE)
    x, y = torch.randn(5, 16, generator=gen).to(DEVICE), torch.randn(7, 16, generator=gen).to(DEVICE)
    torch.library.opcheck(ops.aplot_margin, (rc, rr, x, y, 0.9, 1.0, 1e-8, 0.1, 10, 1.0, 0))
