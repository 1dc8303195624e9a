"""CUDA graphs of a training step: ``torch.compile(mode="reduce-overhead")`` and a manual ``torch.cuda.graph``.

Both replay a step "loss forward and backward" with new data copied into the
captured inputs, and must give what eager gives on that data. Value checks
read nothing back while a graph is captured (README, "torch.compile and CUDA
graphs"). The Triton cost ops compiled by Inductor, which traces their kernel
launches into its graph (``torch.library.triton_op``), give eager's values and
gradients. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import aplot_kernels as ak

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU"),
]

N, M, D = 12, 20, 48


def _backends():
    if not torch.cuda.is_available():
        return ["torch"]
    return [b for b in ak.available_backends("cuda") if b in ("torch", "native", "triton")]


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    tensors = (
        torch.randn(N, generator=gen),
        torch.randn(M, generator=gen),
        torch.randn(N, D, generator=gen),
        torch.randn(M, D, generator=gen),
    )
    return [t.cuda() for t in tensors]


def _eager_step(batch, backend, detach):
    inputs = [t.clone().requires_grad_() for t in batch]
    loss = ak.aplot_loss(*inputs, detach=detach, backend=backend, eps=0.2, n_iters=30)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return loss.detach(), grads


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("backend", _backends())
def test_manual_cuda_graph_of_loss_forward_and_backward(backend, detach):
    static = [t.clone().requires_grad_() for t in _batch(0)]

    def step():
        for t in static:
            t.grad = None
        loss = ak.aplot_loss(*static, detach=detach, backend=backend, eps=0.2, n_iters=30)
        loss.backward()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: kernels compiled, caches filled
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in static:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for seed in (1, 2):
        batch = _batch(seed)
        with torch.no_grad():
            for s, t in zip(static, batch):
                s.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        want, want_grads = _eager_step(batch, backend, detach)
        torch.testing.assert_close(static_loss, want, rtol=1e-5, atol=1e-6)
        for s, w in zip(static, want_grads):
            if w is None:
                assert s.grad is None
            else:
                torch.testing.assert_close(s.grad, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in _backends() if b in ("torch", "native")])
def test_reduce_overhead_compiled_model_step(backend):
    """A model step compiled with mode="reduce-overhead" (CUDA graphs through Inductor) gives eager's loss and
    parameter gradients on fresh batches."""
    torch.manual_seed(0)
    embed = torch.nn.Linear(D, D).cuda()
    head = torch.nn.Linear(D, 1).cuda()
    loss_fn = ak.APLOTLoss(detach=False, backend=backend, eps=0.2, n_iters=30)
    params = list(embed.parameters()) + list(head.parameters())

    def step(chosen, rejected):
        ec, er = embed(chosen), embed(rejected)
        loss = loss_fn(head(ec).squeeze(-1), head(er).squeeze(-1), ec, er)
        return loss, torch.autograd.grad(loss, params)

    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead")
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        chosen, rejected = (torch.randn(N, D, generator=gen).cuda() for _ in range(2))
        got, got_grads = compiled(chosen, rejected)
        got, got_grads = got.clone(), [g.clone() for g in got_grads]  # graph outputs are overwritten by the next replay
        want, want_grads = step(chosen, rejected)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["cosine_cost", "aplot_cost"])
def test_inductor_compiles_the_triton_cost_kernels(op, dtype):
    """``fullgraph=True`` through Inductor: the cost and backward kernels are in the generated code (not an opaque
    op), and the values and gradients are eager's on batched inputs of sizes that are not powers of two."""
    from torch._inductor.utils import run_and_get_code

    if "triton" not in _backends():
        pytest.skip("Triton unavailable")
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(2, N, D, generator=gen), torch.randn(2, M, D, generator=gen)
    rc, rr = torch.randn(2, N, generator=gen), torch.randn(2, M, generator=gen)
    weight = torch.rand(2, N, M, generator=gen).cuda()  # a non-uniform upstream gradient
    inputs = [t.cuda().to(dtype) for t in ((x, y) if op == "cosine_cost" else (x, y, rc, rr))]

    def value(*tensors):
        cost = getattr(ak, op)(*tensors, backend="triton")
        return (cost.square() * weight).sum()

    def run(f):
        tensors = [t.clone().requires_grad_() for t in inputs]
        v = f(*tensors)
        return v, torch.autograd.grad(v, tensors)

    want, want_grads = run(value)
    compiled = torch.compile(value, fullgraph=True, backend="inductor")
    with torch.compiler.config.patch(force_disable_caches=True):  # a cache hit would generate no code to read
        (got, got_grads), code = run_and_get_code(lambda: run(compiled))  # forward and backward compile here
    code = "\n".join(code)
    kernel = "_cosine_cost_kernel" if op == "cosine_cost" else "_aplot_cost_kernel"
    for name in ("_row_norms_kernel", kernel, "_grad_product_kernel", "_normalize_backward_kernel"):
        assert name in code, name
    assert f"aplot_kernels.triton_{op}" not in code
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1.6e-2, 1e-3)  # bfloat16: a rounding apart at most
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.dtype == w.dtype == dtype
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"input {i}: {m}")
