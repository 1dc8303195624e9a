"""FlashAttention's accuracy rule, for every op and kernel backend.

A kernel's error against the float64 reference (on the same, already rounded
inputs) may be at most ``ERROR_MULTIPLE`` times the error of plain PyTorch
in the same input dtype (the ``torch`` backend, which computes half inputs in
float32), plus ``ERROR_FLOOR`` for the cases where PyTorch happens to be
exact (both in ``conftest.py``, which also holds :func:`assert_within_rule`;
``test_sinkhorn_triton.py`` applies it to each Triton strategy). The absolute bounds of
docs/contract.md (conformance figures) are tested elsewhere; this rule
catches a kernel that is within them but sloppier than it needs to be (a
lost float32 accumulation, an early rounding to half, a cruder ``exp``).

Shapes are a table of powers of two and not; inputs are fresh random draws
per test (seeded by the test id).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    COST_BACKENDS,
    DEVICE,
    KERNEL_COST_BACKENDS,
    KERNEL_SINKHORN_BACKENDS,
    assert_within_rule,
    random_cost,
    random_embeddings,
    random_marginal,
    small,
)

import aplot_kernels as ak

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOSS_BACKENDS = [b for b in KERNEL_SINKHORN_BACKENDS if b in COST_BACKENDS]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("size", [(2, 64, 64, 32), (3, 37, 50, 100)], ids=["pow2", "odd"])
@pytest.mark.parametrize("backend", KERNEL_COST_BACKENDS)
def test_costs(backend, size, dtype, gen):
    batch, n, m, d = small(backend, size, (size[0], min(size[1], 24), min(size[2], 19), min(size[3], 40)))
    x, y = random_embeddings(gen, batch, n, d, dtype=dtype), random_embeddings(gen, batch, m, d, dtype=dtype)
    rx, ry = random_embeddings(gen, batch, n, dtype=dtype), random_embeddings(gen, batch, m, dtype=dtype)
    for name, op, args in [("cosine_cost", ak.cosine_cost, (x, y)), ("aplot_cost", ak.aplot_cost, (x, y, rx, ry))]:
        reference64 = op(*(t.double() for t in args), backend="torch")
        assert_within_rule(op(*args, backend=backend), op(*args, backend="torch"), reference64, f"{name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("eps", [0.02, 0.1])
@pytest.mark.parametrize("size", [(4, 64, 64), (3, 45, 71), (1, 130, 97)], ids=["pow2", "odd", "long"])
@pytest.mark.parametrize("backend", KERNEL_SINKHORN_BACKENDS)
def test_sinkhorn_plan(backend, size, eps, dtype, gen):
    batch, n, m = small(backend, size, (size[0], min(size[1], 23), min(size[2], 30)))
    n_iters = small(backend, 50, 15)
    C = random_cost(gen, batch, n, m, scale=2.0, dtype=dtype)  # costs in [0, 2], as the cosine cost
    a, b = random_marginal(gen, batch, n, dtype=torch.float32), random_marginal(gen, batch, m, dtype=torch.float32)
    options = dict(eps=eps, n_iters=n_iters)
    reference64 = ak.sinkhorn(C.double(), a.double(), b.double(), backend="torch", **options)
    plain = ak.sinkhorn(C, a, b, backend="torch", **options)
    kernel = ak.sinkhorn(C, a, b, backend=backend, **options)
    for field in ("plan", "cost", "reg_cost"):
        assert_within_rule(getattr(kernel, field), getattr(plain, field), getattr(reference64, field), f"{field} eps={eps}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("size", [(32, 64), (50, 96), (100, 48)], ids=["pow2", "odd", "many"])
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_margin_and_loss_gradients(backend, size, dtype, gen):
    n, d = small(backend, size, (min(size[0], 20), min(size[1], 40)))
    n_iters = small(backend, 50, 12)
    inputs = [
        random_embeddings(gen, n, dtype=dtype),
        random_embeddings(gen, n, dtype=dtype),
        random_embeddings(gen, n, d, dtype=dtype),
        random_embeddings(gen, n, d, dtype=dtype),
    ]
    options = dict(eps=0.1, n_iters=n_iters)

    def margins(tensors, on):
        return ak.aplot_margin(*tensors, backend=on, **options)

    def reward_grads(tensors, on):  # the detached loss: gradients reach the rewards only
        leaves = [t.clone().requires_grad_() for t in tensors[:2]]
        loss = ak.aplot_loss(*leaves, *tensors[2:], backend=on, **options)
        return torch.cat(torch.autograd.grad(loss, leaves))

    wide = [t.double() for t in inputs]
    assert_within_rule(margins(inputs, backend), margins(inputs, "torch"), margins(wide, "torch"), f"margins {dtype}")
    assert_within_rule(
        reward_grads(inputs, backend), reward_grads(inputs, "torch"), reward_grads(wide, "torch"), f"reward gradients {dtype}"
    )


def test_rule_can_fail():
    """The rule rejects a result that is only as good as half precision, when float32 was possible."""
    reference = torch.linspace(0.1, 1.0, 257, dtype=torch.float64, device=DEVICE)
    plain = reference.float()
    sloppy = reference.to(torch.bfloat16).float()
    assert_within_rule(plain, plain, reference, "float32")
    with pytest.raises(AssertionError, match="error"):
        assert_within_rule(sloppy, plain, reference, "bfloat16 rounding")
