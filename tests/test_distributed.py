"""APLOTLoss across ranks (gloo, two CPU processes) and across micro-steps (the pair bank).

The reference is always the single-process computation on the concatenated
batch: margins, losses and gradients must agree with it.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aplot_kernels import APLOTLoss, aplot_margin, bt_loss
from aplot_kernels.distributed import gather_rows

# Rank r holds PAIRS[r] pairs and EXTRA[r] extra rejected responses: uneven on purpose.
PAIRS, EXTRA, DIM = (3, 5), (0, 2), 6
OPTIONS = dict(alpha=0.7, temperature=0.5, eps=0.2, n_iters=200, backend="torch")


def global_batch():
    """Every rank's inputs, float64: ``[(rc, rr_with_extras, ec, er_with_extras)]`` per rank."""
    gen = torch.Generator().manual_seed(7)
    parts = []
    for n, e in zip(PAIRS, EXTRA):
        parts.append((
            torch.randn(n, generator=gen, dtype=torch.float64),
            torch.randn(n + e, generator=gen, dtype=torch.float64),
            torch.randn(n, DIM, generator=gen, dtype=torch.float64),
            torch.randn(n + e, DIM, generator=gen, dtype=torch.float64),
        ))
    return parts


def concatenated(parts):
    """The single-process problem: all chosen; all paired rejected, then all extras."""
    rc = torch.cat([p[0] for p in parts])
    ec = torch.cat([p[2] for p in parts])
    rr = torch.cat([p[1][: len(p[0])] for p in parts] + [p[1][len(p[0]):] for p in parts])
    er = torch.cat([p[3][: len(p[0])] for p in parts] + [p[3][len(p[0]):] for p in parts])
    return rc, rr, ec, er


def reference(parts, detach):
    """Per-rank margins and losses of the single-process problem, and the gradients of the summed rank losses."""
    leaves = [tuple(t.clone().requires_grad_(True) for t in p) for p in parts]
    rc, rr, ec, er = concatenated(leaves)
    margins = aplot_margin(rc, rr, ec, er, detach=detach, **OPTIONS)
    losses, start = [], 0
    for (c, r, _, _), n in zip(leaves, PAIRS):
        losses.append(bt_loss(c, r[:n], margins[start:start + n]))
        start += n
    sum(losses).backward()
    splits = torch.split(margins.detach(), list(PAIRS))
    return splits, [l.detach() for l in losses], [tuple(t.grad for t in leaf) for leaf in leaves]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        local = global_batch()[rank]
        # Uneven gather of a plain tensor.
        gathered, offset, sizes = gather_rows(local[2])
        results["gathered"], results["offset"], results["sizes"] = gathered, offset, sizes
        for detach in (True, False):
            inputs = tuple(t.clone().requires_grad_(True) for t in local)
            module = APLOTLoss(gather_across_devices=True, detach=detach, **OPTIONS)
            out = module(*inputs, return_outputs=True)
            out.loss.backward()
            results[detach] = dict(
                margins=out.margins.detach(), loss=out.loss.detach(), grads=tuple(t.grad for t in inputs),
                plan_shape=tuple(out.plan.shape), local_offset=module.local_offset,
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


def test_uneven_gather(two_rank_results):
    parts = global_batch()
    expected = torch.cat([p[2] for p in parts])
    for rank, res in enumerate(two_rank_results):
        assert res["sizes"] == list(PAIRS)
        assert res["offset"] == sum(PAIRS[:rank])
        torch.testing.assert_close(res["gathered"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("detach", [True, False])
def test_margins_losses_and_grads_match_the_concatenated_batch(two_rank_results, detach):
    margins, losses, grads = reference(global_batch(), detach)
    total_pairs, total_rejected = sum(PAIRS), sum(PAIRS) + sum(EXTRA)
    for rank, res in enumerate(two_rank_results):
        got = res[detach]
        assert got["plan_shape"] == (total_pairs, total_rejected)
        assert got["local_offset"] == sum(PAIRS[:rank])
        torch.testing.assert_close(got["margins"], margins[rank], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["loss"], losses[rank], rtol=1e-9, atol=1e-12)
        # Each rank's inputs get the gradient of the sum of all ranks' losses (DDP then averages).
        for name, g, ref in zip(("chosen_rewards", "rejected_rewards", "chosen_emb", "rejected_emb"), got["grads"], grads[rank]):
            torch.testing.assert_close(g, ref, rtol=1e-7, atol=1e-10, msg=f"{name} (detach={detach})")


def test_gather_is_a_no_op_without_a_process_group():
    module = APLOTLoss(gather_across_devices=True, **OPTIONS)
    rc, rr, ec, er = global_batch()[1]
    torch.testing.assert_close(module(rc, rr, ec, er), APLOTLoss(**OPTIONS)(rc, rr, ec, er), rtol=0, atol=0)


def test_bank_gives_the_effective_batch_problem():
    """Micro-step k sees itself and the last K micro-steps: rows of the concatenated problem."""
    gen = torch.Generator().manual_seed(3)
    steps = [
        (torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64),
         torch.randn(4, DIM, generator=gen, dtype=torch.float64), torch.randn(5, DIM, generator=gen, dtype=torch.float64))
        for _ in range(4)
    ]
    module = APLOTLoss(bank_size=2, **OPTIONS)
    for k, step in enumerate(steps):
        out = module(*step, return_outputs=True)
        window = [step] + steps[max(0, k - 2):k][::-1]  # current first, then newest banked
        n = len(step[0])
        expected = aplot_margin(*concatenated(window), **OPTIONS)[:n]
        torch.testing.assert_close(out.margins, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.loss, bt_loss(step[0], step[1][:n], expected))
        assert out.plan.shape == (4 * len(window), 5 * len(window))
    assert len(module.bank) == 2
    # Evaluation mode neither reads nor fills the bank.
    module.eval()
    out = module(*steps[0], return_outputs=True)
    assert out.plan.shape == (4, 5) and len(module.bank) == 2
    module.reset_bank()
    assert len(module.bank) == 0


def test_bank_size_is_checked():
    with pytest.raises(ValueError, match="bank_size"):
        APLOTLoss(bank_size=-1)
