"""Inputs and checks shared by the Triton test files (test_*_triton.py).

They call the kernel modules directly, which run on a GPU or, on the CPU,
under the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest.py):
shapes stay small (N, M <= 24, D <= 40) because the interpreter runs every
program in Python.
"""

from __future__ import annotations

import pytest
import torch

from aplot_kernels import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_OK, TRITON_WHY = backends.triton_status(DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"Triton unavailable: {TRITON_WHY}")

HALF = (torch.float16, torch.bfloat16)
# docs/contract.md, conformance figures: a float32 solve holds max |plan diff| <= 1e-5 * max plan
# entry against the float64 torch reference on the same (rounded) inputs, whatever dtype C arrives in.
PLAN_BOUND = 1e-5


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def embeddings(batch, n, m, d, dtype, seed):
    """``(x, y, rx, ry)``: ``[B, N, D]``, ``[B, M, D]``, ``[B, N]``, ``[B, M]``, with a zero vector in ``x``."""
    gen = generator(seed)
    x = torch.randn(batch, n, d, generator=gen).to(dtype)
    y = torch.randn(batch, m, d, generator=gen).to(dtype)
    x[0, 0] = 0  # a zero vector: cost 1 to everything, never NaN
    rx = torch.randn(batch, n, generator=gen).to(dtype)
    ry = torch.randn(batch, m, generator=gen).to(dtype)
    return tuple(t.to(DEVICE) for t in (x, y, rx, ry))


def problem(batch, n, m, dtype, seed, *, pad=False, cost_scale=2.0):
    """``(C [B, N, M], a [B, N], b [B, M])`` with unit masses; ``pad``: trailing and interior zero weights."""
    gen = generator(seed)
    C = (torch.rand(batch, n, m, generator=gen) * cost_scale).to(dtype)
    a = torch.rand(batch, n, generator=gen) + 0.1
    b = torch.rand(batch, m, generator=gen) + 0.1
    if pad:
        a[0, -3:] = 0
        a[-1, 1] = 0
        b[-1, :2] = 0
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    return C.to(DEVICE), a.to(DEVICE), b.to(DEVICE)


def assert_matches_reference(out, C, a, b, eps, n_iters, tol, check_every):
    """Every field of a Triton ``SolveOutput`` against the float64 reference solve; returns the reference."""
    from aplot_kernels.sinkhorn import reference

    ref = reference.solve(C.double(), a.double(), b.double(), eps, n_iters, tol, check_every)
    for name in out._fields:
        value = getattr(out, name)
        assert bool(torch.isfinite(value.double()).all()), f"non-finite {name}"
    scale = ref.plan.abs().max().item()
    plan_diff = (out.plan.double() - ref.plan).abs().max().item()
    assert plan_diff <= PLAN_BOUND * scale, f"plan differs by {plan_diff / scale:.2e} of its max entry"
    assert out.plan.dtype == out.f.dtype == out.cost.dtype == torch.float32
    assert out.n_iters.dtype == torch.int64
    assert out.n_iters.tolist() == ref.n_iters.tolist()
    torch.testing.assert_close(out.cost.double(), ref.cost, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.reg_cost.double(), ref.reg_cost, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.err.double(), ref.err, rtol=1e-3, atol=1e-6)
    # Potentials matter only up to rounding of eps * log(...); padded ones are reported as 0.
    torch.testing.assert_close(out.f.double(), ref.f, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.g.double(), ref.g, rtol=0, atol=1e-5)
    # Padding: exact zero rows and columns.
    assert bool((out.plan.transpose(1, 2)[b == 0] == 0).all())
    assert bool((out.plan[a == 0] == 0).all())
    assert bool((out.f[a == 0] == 0).all()) and bool((out.g[b == 0] == 0).all())
    return ref


def shrink_tiles(monkeypatch):
    """Tiles smaller than the test problems, so every streaming loop runs over several tiles."""
    from aplot_kernels.sinkhorn.triton import common

    for key, value in dict(row_block_n=8, row_block_m=16, col_block_n=16, col_block_m=8, check_block=8).items():
        monkeypatch.setitem(common.TILED_BLOCKS, key, value)
    from aplot_kernels.sinkhorn.triton.experimental import onepass

    monkeypatch.setattr(onepass, "ONEPASS_TILE", 64)  # a few rows per block, several parts per problem
    monkeypatch.setattr(onepass, "ONEPASS_SUM_BLOCK", 8)  # several column blocks per problem
