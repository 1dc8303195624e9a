"""APLOTLoss across ranks (gloo, two CPU processes) and across micro-steps (the pair bank).

The reference is always the single-process computation on the concatenated
batch: margins, losses and gradients must agree with it.
"""

from __future__ import annotations

import gc
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
        parts.append(
            (
                torch.randn(n, generator=gen, dtype=torch.float64),
                torch.randn(n + e, generator=gen, dtype=torch.float64),
                torch.randn(n, DIM, generator=gen, dtype=torch.float64),
                torch.randn(n + e, DIM, generator=gen, dtype=torch.float64),
            )
        )
    return parts


def concatenated(parts):
    """The single-process problem: all chosen; all paired rejected, then all extras."""
    rc = torch.cat([p[0] for p in parts])
    ec = torch.cat([p[2] for p in parts])
    rr = torch.cat([p[1][: len(p[0])] for p in parts] + [p[1][len(p[0]) :] for p in parts])
    er = torch.cat([p[3][: len(p[0])] for p in parts] + [p[3][len(p[0]) :] for p in parts])
    return rc, rr, ec, er


def reference(parts, detach):
    """What each rank must return, from the single-process problem on the concatenated batch.

    Rank ``r`` returns ``W / N * sum of its pair losses`` (``W`` ranks, ``N`` pairs in all), whose DDP
    average is the global mean; its inputs get the gradient of the sum of all ranks' returned losses,
    ``W`` times the gradient of the global mean (DDP's average then divides by ``W``).
    """
    leaves = [tuple(t.clone().requires_grad_(True) for t in p) for p in parts]
    rc, rr, ec, er = concatenated(leaves)
    margins = aplot_margin(rc, rr, ec, er, detach=detach, **OPTIONS)
    world, total = len(parts), sum(PAIRS)
    losses, start = [], 0
    for (c, r, _, _), n in zip(leaves, PAIRS):
        losses.append(world / total * bt_loss(c, r[:n], margins[start : start + n], reduction="sum"))
        start += n
    sum(losses).backward()
    splits = torch.split(margins.detach(), list(PAIRS))
    return splits, [loss.detach() for loss in losses], [tuple(t.grad for t in leaf) for leaf in leaves]


# A DDP model on uneven batches: rank r holds MODEL_PAIRS[r] pairs of features.
MODEL_PAIRS, FEATURES = (8, 4), 5


def model_inputs():
    """Features ``(chosen [n_r, F], rejected [n_r, F])`` of every rank, float64."""
    gen = torch.Generator().manual_seed(11)
    return [
        (
            torch.randn(n, FEATURES, generator=gen, dtype=torch.float64),
            torch.randn(n, FEATURES, generator=gen, dtype=torch.float64),
        )
        for n in MODEL_PAIRS
    ]


def tiny_reward_model():
    torch.manual_seed(5)
    return torch.nn.Linear(FEATURES, DIM + 1, dtype=torch.float64)


def model_loss(model, loss_module, chosen_x, rejected_x):
    """The reward is the last output, the embedding the others."""
    out_c, out_r = model(chosen_x), model(rejected_x)
    return loss_module(out_c[:, -1], out_r[:, -1], out_c[:, :-1], out_r[:, :-1])


def model_reference(detach):
    """The global pair mean on one process: its value and the model's gradient."""
    model = tiny_reward_model()
    chosen_x = torch.cat([c for c, _ in model_inputs()])
    rejected_x = torch.cat([r for _, r in model_inputs()])
    loss = model_loss(model, APLOTLoss(detach=detach, **OPTIONS), chosen_x, rejected_x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def bank_dtype_steps():
    """Two micro-steps per rank: float32 rewards, bfloat16 embeddings."""
    gen = torch.Generator().manual_seed(13)
    return [
        [
            (
                torch.randn(n, generator=gen),
                torch.randn(n, generator=gen),
                torch.randn(n, DIM, generator=gen).bfloat16(),
                torch.randn(n, DIM, generator=gen).bfloat16(),
            )
            for n in PAIRS
        ]
        for _ in range(2)
    ]


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
                margins=out.margins.detach(),
                loss=out.loss.detach(),
                grads=tuple(t.grad for t in inputs),
                plan_shape=tuple(out.plan.shape),
                local_offset=module.local_offset,
            )
        for detach in (True, False):
            model = torch.nn.parallel.DistributedDataParallel(tiny_reward_model())
            loss = model_loss(model, APLOTLoss(gather_across_devices=True, detach=detach, **OPTIONS), *model_inputs()[rank])
            loss.backward()
            results[("ddp", detach)] = dict(loss=loss.detach(), grads=[p.grad.clone() for p in model.parameters()])
        # Free the DDP reducers while the process group lives: freed after destroy_process_group, the last
        # reference to the group joins its worker thread with the GIL held, while that thread may wait on
        # the GIL to free a finished all-reduce's tensors (a deadlock: 3 runs in 26 on a 2-core machine).
        del model, loss
        gc.collect()
        dist.barrier()
        # Gather and bank with float32 rewards and bfloat16 embeddings: the second call's margins.
        module = APLOTLoss(gather_across_devices=True, bank_size=1, **OPTIONS)
        for step in bank_dtype_steps():
            results["bank_dtype"] = module(*step[rank], return_outputs=True).margins
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
        # Each rank's inputs get the gradient of the sum of all ranks' returned losses (DDP then averages).
        for name, g, ref in zip(("chosen_rewards", "rejected_rewards", "chosen_emb", "rejected_emb"), got["grads"], grads[rank]):
            torch.testing.assert_close(g, ref, rtol=1e-7, atol=1e-10, msg=f"{name} (detach={detach})")


@pytest.mark.parametrize("detach", [True, False])
def test_ddp_average_is_the_global_pair_mean(two_rank_results, detach):
    """8 + 4 pairs: the DDP-averaged loss and the model's gradients equal one process on all 12 pairs."""
    loss, grads = model_reference(detach)
    got = [res[("ddp", detach)] for res in two_rank_results]
    torch.testing.assert_close(sum(g["loss"] for g in got) / len(got), loss, rtol=0, atol=1e-6)
    for res in got:  # DDP leaves the averaged gradient on every rank
        for g, ref in zip(res["grads"], grads):
            torch.testing.assert_close(g, ref, rtol=0, atol=1e-6)
    # The plain mean of the two local means is not the global mean on uneven counts.
    assert MODEL_PAIRS[0] != MODEL_PAIRS[1]


def test_gathered_bank_keeps_float32_rewards(two_rank_results):
    """Second call: gathered current responses, then the banked ones, rewards never rounded to bfloat16."""
    first, second = bank_dtype_steps()
    problem = concatenated(second)
    banked = concatenated(first)
    rc, rr, ec, er = (torch.cat([a, b]) for a, b in zip(problem, banked))
    # Rejected rows: current paired, banked paired (no extras here).
    expected = aplot_margin(rc, rr, ec, er, **OPTIONS)
    for rank, res in enumerate(two_rank_results):
        start = sum(PAIRS[:rank])
        assert res["bank_dtype"].dtype == torch.float32
        torch.testing.assert_close(res["bank_dtype"], expected[start : start + PAIRS[rank]], rtol=1e-5, atol=1e-5)


def test_gather_is_a_no_op_without_a_process_group():
    module = APLOTLoss(gather_across_devices=True, **OPTIONS)
    rc, rr, ec, er = global_batch()[1]
    torch.testing.assert_close(module(rc, rr, ec, er), APLOTLoss(**OPTIONS)(rc, rr, ec, er), rtol=0, atol=0)


def micro_steps(count, n=4, m=5, dtype=torch.float64, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, generator=gen, dtype=dtype),
            torch.randn(m, generator=gen, dtype=dtype),
            torch.randn(n, DIM, generator=gen, dtype=dtype),
            torch.randn(m, DIM, generator=gen, dtype=dtype),
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize("accumulation", [3, 4])
def test_bank_sees_only_its_effective_batch(accumulation):
    """bank_size = G - 1: micro-step k of an effective batch sees micro-steps 0..k of that batch, never an
    earlier batch, and the last one solves the problem of the whole effective batch."""
    steps = micro_steps(2 * accumulation + 1)
    module = APLOTLoss(bank_size=accumulation - 1, **OPTIONS)
    for index, step in enumerate(steps):
        k, batch_start = index % accumulation, index - index % accumulation
        out = module(*step, return_outputs=True)
        window = [step] + steps[batch_start:index][::-1]  # current first, then newest banked
        n = len(step[0])
        expected = aplot_margin(*concatenated(window), **OPTIONS)[:n]
        torch.testing.assert_close(out.margins, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.loss, bt_loss(step[0], step[1][:n], expected))
        assert out.plan.shape == (4 * (k + 1), 5 * (k + 1))  # nothing from an earlier effective batch
        if k == accumulation - 1:
            # One problem over the whole effective batch, in its natural order.
            whole = aplot_margin(*concatenated(steps[batch_start : index + 1]), **OPTIONS)
            torch.testing.assert_close(out.margins, whole[k * n :], rtol=1e-8, atol=1e-10)
            assert len(module.bank) == 0
        else:
            assert len(module.bank) == k + 1
    # Evaluation mode neither reads nor fills the bank.
    module.eval()
    out = module(*steps[0], return_outputs=True)
    assert out.plan.shape == (4, 5) and len(module.bank) == 1
    module.reset_bank()
    assert len(module.bank) == 0


def test_bank_keeps_copies():
    """A caller that refills its input buffers in place does not change the banked responses."""
    first, second = micro_steps(2, seed=21)
    buffers = tuple(t.clone() for t in first)
    module = APLOTLoss(bank_size=1, **OPTIONS)
    module(*buffers)
    for buffer, new in zip(buffers, second):
        buffer.copy_(new)
    out = module(*buffers, return_outputs=True)
    expected = aplot_margin(*concatenated([second, first]), **OPTIONS)[:4]
    torch.testing.assert_close(out.margins, expected, rtol=1e-10, atol=1e-12)


def test_bank_keeps_the_rewards_dtype():
    """bfloat16 embeddings beside float32 rewards: banked rewards stay float32 (not rounded to bfloat16)."""
    steps = [
        (rc * 7, rr * 7, ec.bfloat16(), er.bfloat16())  # rewards of a few units, where bfloat16 rounds by ~0.03
        for rc, rr, ec, er in micro_steps(2, n=5, m=5, dtype=torch.float32, seed=8)
    ]
    module = APLOTLoss(bank_size=1, **OPTIONS)
    module(*steps[0])
    out = module(*steps[1], return_outputs=True)
    expected = aplot_margin(*concatenated([steps[1], steps[0]]), **OPTIONS)[:5]
    torch.testing.assert_close(out.margins, expected, rtol=1e-6, atol=1e-6)


def test_bank_width_change_is_named():
    first, second = micro_steps(2, seed=4)
    module = APLOTLoss(bank_size=1, **OPTIONS)
    module(*first)
    wider = (second[0], second[1], torch.cat([second[2], second[2][:, :1]], 1), torch.cat([second[3], second[3][:, :1]], 1))
    with pytest.raises(ValueError, match="chosen_emb"):
        module(*wider)


def test_bool_options_are_checked():
    with pytest.raises(TypeError, match="detach"):
        APLOTLoss(detach="no")
    with pytest.raises(TypeError, match="gather_across_devices"):
        APLOTLoss(gather_across_devices=1)
    with pytest.raises(TypeError, match="n_iters"):
        APLOTLoss(n_iters=10.5)


def test_bank_size_is_checked():
    with pytest.raises(ValueError, match="bank_size"):
        APLOTLoss(bank_size=-1)
