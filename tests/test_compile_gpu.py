"""CUDA graphs of a training step: ``torch.compile(mode="reduce-overhead")`` and a manual ``torch.cuda.graph``.

Both replay a step "loss forward and backward" with new data copied into the
captured inputs, and must give what eager gives on that data. Value checks
read nothing back while a graph is captured (README, "torch.compile and CUDA
graphs"). Skipped without a GPU.
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
