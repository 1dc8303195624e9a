"""Bad input (docs/contract.md section 4): every public function rejects it before any kernel runs, naming the argument.

Value errors raise ``ValueError``; wrong types (and integer dtypes) raise
``TypeError`` (``ArgumentTypeError`` is both). Inputs are never modified.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import COST_BACKENDS, DEVICE, SINKHORN_BACKENDS, DeviceOps, widest_dtype

import aplot_kernels
from aplot_kernels import APLOTLoss, aplot_cost, aplot_loss, aplot_margin, bt_loss, cosine_cost, sinkhorn
from aplot_kernels import _checks
from aplot_kernels.cost import reference as cost_reference
from aplot_kernels.sinkhorn import reference as sinkhorn_reference


def t(*shape, dtype=torch.float32, device=DEVICE, value=None):
    """A small deterministic tensor (values do not matter here)."""
    x = torch.linspace(0.1, 0.9, int(np.prod(shape)) if shape else 1, dtype=torch.float64).reshape(shape)
    if value is not None:
        x = torch.full(shape, value, dtype=torch.float64)
    return x.to(dtype=dtype, device=device)


def uniform(n, dtype=torch.float32):
    return torch.full((n,), 1.0 / n, dtype=dtype, device=DEVICE)


def with_entry(x, index, value):
    x = x.clone()
    x[index] = value
    return x


def loss_args(n=3, m=None):
    m = n if m is None else m
    return t(n), t(m), t(n, 4), t(m, 4)


# (call, argument named in the message)
VALUE_ERRORS = {
    # mismatched shapes
    "cosine-width": (lambda: cosine_cost(t(3, 4), t(5, 6)), "`x` and `y`"),
    "cosine-ndim": (lambda: cosine_cost(t(3, 4), t(2, 5, 4)), "`x` and `y`"),
    "cosine-batch": (lambda: cosine_cost(t(2, 3, 4), t(3, 5, 4)), "`x` and `y`"),
    "cosine-1d": (lambda: cosine_cost(t(4)), "`x`"),
    "aplot-rewards-shape": (lambda: aplot_cost(t(3, 4), t(5, 4), t(4), t(5)), "`chosen_rewards`"),
    "aplot-rewards-batch": (lambda: aplot_cost(t(2, 3, 4), t(2, 5, 4), t(2, 3), t(5)), "`rejected_rewards`"),
    "sinkhorn-a-length": (lambda: sinkhorn(t(3, 4), uniform(4)), "`a`"),
    "sinkhorn-b-batch": (lambda: sinkhorn(t(2, 3, 4), None, uniform(4).expand(3, 4)), "`b`"),
    "sinkhorn-a-2d-unbatched": (lambda: sinkhorn(t(3, 4), uniform(3)[None]), "`a`"),
    "sinkhorn-C-1d": (lambda: sinkhorn(t(4)), "`C`"),
    "bt-lengths": (lambda: bt_loss(t(3), t(4)), "`chosen_rewards` and `rejected_rewards`"),
    "bt-margin-shape": (lambda: bt_loss(t(3), t(3), t(4)), "`margin`"),
    "margin-fewer-rejected": (lambda: aplot_margin(t(3), t(2), t(3, 4), t(2, 4)), "`rejected_rewards`"),
    "margin-emb-rows": (lambda: aplot_margin(t(3), t(3), t(4, 4), t(3, 4)), "`chosen_rewards`"),
    "margin-emb-width": (lambda: aplot_margin(t(3), t(3), t(3, 4), t(3, 5)), "`chosen_emb` and `rejected_emb`"),
    "margin-batched-emb": (lambda: aplot_margin(t(3), t(3), t(1, 3, 4), t(1, 3, 4)), "`chosen_emb`"),
    "loss-dataset-margin": (lambda: aplot_loss(*loss_args(), margin=t(2)), "`margin`"),
    # eps <= 0 and other bad numbers
    "cosine-eps-zero": (lambda: cosine_cost(t(3, 4), eps=0.0), "`eps`"),
    "sinkhorn-eps-zero": (lambda: sinkhorn(t(3, 4), eps=0.0), "`eps`"),
    "sinkhorn-eps-negative": (lambda: sinkhorn(t(3, 4), eps=-0.1), "`eps`"),
    "sinkhorn-eps-inf": (lambda: sinkhorn(t(3, 4), eps=float("inf")), "`eps`"),
    "margin-eps-zero": (lambda: aplot_margin(*loss_args(), eps=0.0), "`eps`"),
    "loss-eps-negative": (lambda: aplot_loss(*loss_args(), eps=-1.0), "`eps`"),
    "module-eps-zero": (lambda: APLOTLoss(eps=0.0), "`eps`"),
    "aplot-temperature-zero": (lambda: aplot_cost(t(3, 4), t(5, 4), t(3), t(5), temperature=0.0), "`temperature`"),
    "aplot-alpha-range": (lambda: aplot_cost(t(3, 4), t(5, 4), t(3), t(5), alpha=1.5), "`alpha`"),
    "margin-alpha-range": (lambda: aplot_margin(*loss_args(), alpha=-0.1), "`alpha`"),
    "loss-scale-nan": (lambda: aplot_loss(*loss_args(), scale=float("nan")), "`scale`"),
    # n_iters < 1, check_every < 1, negative tol
    "sinkhorn-n-iters-zero": (lambda: sinkhorn(t(3, 4), n_iters=0), "`n_iters`"),
    "margin-n-iters-zero": (lambda: aplot_margin(*loss_args(), n_iters=0), "`n_iters`"),
    "loss-n-iters-negative": (lambda: aplot_loss(*loss_args(), n_iters=-3), "`n_iters`"),
    "module-n-iters-zero": (lambda: APLOTLoss(n_iters=0), "`n_iters`"),
    "sinkhorn-check-every-zero": (lambda: sinkhorn(t(3, 4), tol=1e-3, check_every=0), "`check_every`"),
    "sinkhorn-tol-negative": (lambda: sinkhorn(t(3, 4), tol=-1e-3), "`tol`"),
    # marginals
    "sinkhorn-a-negative": (lambda: sinkhorn(t(3, 4), torch.tensor([0.5, 0.7, -0.2], device=DEVICE)), "`a`"),
    "sinkhorn-b-negative": (lambda: sinkhorn(t(3, 4), None, torch.tensor([0.5, 0.7, -0.2, 0.0], device=DEVICE)), "`b`"),
    "sinkhorn-unbalanced": (lambda: sinkhorn(t(3, 4), uniform(3), 2 * uniform(4)), "`a` and `b`"),
    "sinkhorn-unbalanced-one-problem": (
        lambda: sinkhorn(t(2, 3, 4), None, torch.stack([uniform(4), 1.001 * uniform(4)])),
        "`a` and `b`",
    ),
    "sinkhorn-a-all-zero": (lambda: sinkhorn(t(3, 4), torch.zeros(3, device=DEVICE), torch.zeros(4, device=DEVICE)), "`a`"),
    # empty dimensions
    "cosine-empty-rows": (lambda: cosine_cost(t(0, 4)), "`x`"),
    "cosine-empty-width": (lambda: cosine_cost(t(3, 0), t(2, 0)), "`x`"),
    "cosine-empty-batch": (lambda: cosine_cost(t(0, 3, 4), t(0, 2, 4)), "`x`"),
    "sinkhorn-empty-cols": (lambda: sinkhorn(t(3, 0)), "`C`"),
    "sinkhorn-empty-batch": (lambda: sinkhorn(t(0, 3, 4)), "`C`"),
    "bt-empty": (lambda: bt_loss(t(0), t(0)), "`chosen_rewards`"),
    "margin-empty": (lambda: aplot_margin(t(0), t(0), t(0, 4), t(0, 4)), "`chosen_rewards`"),
    # NaN and inf
    "cosine-nan": (lambda: cosine_cost(with_entry(t(3, 4), (1, 2), float("nan"))), "`x`"),
    "cosine-y-inf": (lambda: cosine_cost(t(3, 4), with_entry(t(2, 4), (0, 0), float("inf"))), "`y`"),
    "aplot-reward-inf": (lambda: aplot_cost(t(3, 4), t(5, 4), with_entry(t(3), 1, float("-inf")), t(5)), "`chosen_rewards`"),
    "sinkhorn-C-nan": (lambda: sinkhorn(with_entry(t(3, 4), (0, 1), float("nan"))), "`C`"),
    "sinkhorn-C-inf": (lambda: sinkhorn(with_entry(t(3, 4), (0, 1), float("inf"))), "`C`"),
    "sinkhorn-a-nan": (lambda: sinkhorn(t(3, 4), with_entry(uniform(3), 0, float("nan"))), "`a`"),
    "bt-nan": (lambda: bt_loss(t(3), with_entry(t(3), 0, float("nan"))), "`rejected_rewards`"),
    "bt-margin-inf": (lambda: bt_loss(t(3), t(3), float("inf")), "`margin`"),
    "loss-margin-nan": (lambda: aplot_loss(*loss_args(), margin=with_entry(t(3), 2, float("nan"))), "`margin`"),
    "margin-emb-nan": (lambda: aplot_margin(t(3), t(3), t(3, 4), with_entry(t(3, 4), (2, 2), float("nan"))), "`rejected_emb`"),
    # unknown names
    "cosine-backend": (lambda: cosine_cost(t(3, 4), backend="cuda"), "`backend`"),
    "sinkhorn-backend": (lambda: sinkhorn(t(3, 4), backend="pot"), "`backend`"),
    "sinkhorn-grad": (lambda: sinkhorn(t(3, 4), grad="autodiff"), "`grad`"),
    "unrolled-needs-torch": (lambda: sinkhorn(t(3, 4), grad="unrolled", backend="native"), "backend='torch'"),
    "bt-reduction": (lambda: bt_loss(t(3), t(3), reduction="avg"), "`reduction`"),
    "loss-reduction": (lambda: aplot_loss(*loss_args(), reduction="batchmean"), "`reduction`"),
    "loss-backend": (lambda: aplot_loss(*loss_args(), backend="gpu"), "`backend`"),
    "margin-backend": (lambda: aplot_margin(*loss_args(), backend="gpu"), "`backend`"),
    "module-reduction": (lambda: APLOTLoss(reduction="max"), "`reduction`"),
    "module-backend": (lambda: APLOTLoss(backend="fast")(*loss_args()), "`backend`"),
}

TYPE_ERRORS = {
    # integer and other non-float dtypes
    "cosine-int": (lambda: cosine_cost(torch.ones(3, 4, dtype=torch.int64, device=DEVICE)), "`x`"),
    "cosine-bool-y": (lambda: cosine_cost(t(3, 4), torch.ones(3, 4, dtype=torch.bool, device=DEVICE)), "`y`"),
    "aplot-int-rewards": (lambda: aplot_cost(t(3, 4), t(5, 4), torch.arange(3, device=DEVICE), t(5)), "`chosen_rewards`"),
    "sinkhorn-int-C": (lambda: sinkhorn(torch.ones(3, 4, dtype=torch.int32, device=DEVICE)), "`C`"),
    "sinkhorn-int-b": (lambda: sinkhorn(t(4, 4), None, torch.ones(4, dtype=torch.int64, device=DEVICE)), "`b`"),
    "sinkhorn-complex-C": (lambda: sinkhorn(torch.ones(3, 4, dtype=torch.complex64, device=DEVICE)), "`C`"),
    "bt-int": (lambda: bt_loss(torch.arange(3, device=DEVICE), t(3)), "`chosen_rewards`"),
    "margin-int-emb": (
        lambda: aplot_margin(t(3), t(3), torch.ones(3, 4, dtype=torch.int64, device=DEVICE), t(3, 4)),
        "`chosen_emb`",
    ),
    # wrong types
    "cosine-list": (lambda: cosine_cost([[1.0, 0.0], [0.0, 1.0]]), "`x`"),
    "cosine-numpy": (lambda: cosine_cost(np.ones((3, 4))), "`x`"),
    "sinkhorn-list-C": (lambda: sinkhorn([[0.0, 1.0], [1.0, 0.0]]), "`C`"),
    "sinkhorn-numpy-a": (lambda: sinkhorn(t(3, 4), np.full(3, 1 / 3)), "`a`"),
    "sinkhorn-eps-str": (lambda: sinkhorn(t(3, 4), eps="0.1"), "`eps`"),
    "sinkhorn-eps-tensor": (lambda: sinkhorn(t(3, 4), eps=torch.tensor(0.1)), "`eps`"),
    "sinkhorn-n-iters-float": (lambda: sinkhorn(t(3, 4), n_iters=10.0), "`n_iters`"),
    "sinkhorn-n-iters-bool": (lambda: sinkhorn(t(3, 4), n_iters=True), "`n_iters`"),
    "sinkhorn-tol-str": (lambda: sinkhorn(t(3, 4), tol="1e-3"), "`tol`"),
    "aplot-alpha-none": (lambda: aplot_cost(t(3, 4), t(5, 4), t(3), t(5), alpha=None), "`alpha`"),
    "bt-list": (lambda: bt_loss([1.0, 2.0], t(2)), "`chosen_rewards`"),
    "bt-margin-str": (lambda: bt_loss(t(2), t(2), "0.5"), "`margin`"),
    "margin-n-iters-float": (lambda: aplot_margin(*loss_args(), n_iters=5.0), "`n_iters`"),
    "loss-unknown-option": (lambda: aplot_loss(*loss_args(), epsilon=0.1), "epsilon"),
    "loss-none-emb": (lambda: aplot_loss(t(3), t(3), None, t(3, 4)), "`chosen_emb`"),
}


@pytest.mark.parametrize("call,name", list(VALUE_ERRORS.values()), ids=list(VALUE_ERRORS))
def test_value_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=_escaped(name)):
        call()


@pytest.mark.parametrize("call,name", list(TYPE_ERRORS.values()), ids=list(TYPE_ERRORS))
def test_type_errors_name_the_argument(call, name):
    with pytest.raises(TypeError, match=_escaped(name)):
        call()


def _escaped(text):
    import re

    return re.escape(text)


def test_type_errors_are_also_value_errors():
    """Callers may catch either: an integer dtype is a TypeError and a ValueError."""
    with pytest.raises(ValueError, match="`C`"):
        sinkhorn(torch.ones(3, 4, dtype=torch.int64, device=DEVICE))
    assert issubclass(aplot_kernels.ArgumentTypeError, TypeError)
    assert issubclass(aplot_kernels.ArgumentTypeError, ValueError)


def test_unrolled_with_kernel_backend_is_a_value_error():
    for backend in ("triton", "native"):
        with pytest.raises(ValueError, match="grad='unrolled'"):
            sinkhorn(t(3, 4), grad="unrolled", backend=backend)


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------


def test_same_device_check_names_both_arguments():
    """The shared device check, on the 'meta' device (no GPU needed)."""
    with pytest.raises(ValueError, match="`b` is on meta but `a` is on cpu"):
        _checks.same_device(a=torch.ones(2), b=torch.ones(2, device="meta"))
    _checks.same_device(a=torch.ones(2), b=None, c=torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
@pytest.mark.parametrize(
    "call,name",
    [
        (lambda cpu: cosine_cost(t(3, 4), t(2, 4, device=cpu)), "`y`"),
        (lambda cpu: aplot_cost(t(3, 4), t(5, 4), t(3), t(5, device=cpu)), "`rejected_rewards`"),
        (lambda cpu: sinkhorn(t(3, 4), t(3, device=cpu) / t(3).sum().cpu()), "`a`"),
        (lambda cpu: bt_loss(t(3), t(3, device=cpu)), "`rejected_rewards`"),
        (lambda cpu: bt_loss(t(3), t(3), t(3, device=cpu)), "`margin`"),
        (lambda cpu: aplot_margin(t(3), t(3), t(3, 4), t(3, 4, device=cpu)), "`rejected_emb`"),
    ],
)
def test_mismatched_devices(call, name):
    with pytest.raises(ValueError, match=_escaped(name)):
        call(torch.device("cpu"))


# ---------------------------------------------------------------------------
# Checks run before any kernel
# ---------------------------------------------------------------------------


def test_loss_options_are_checked_before_any_kernel(monkeypatch):
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(1)
        raise AssertionError("a kernel ran before the arguments were checked")

    monkeypatch.setattr(cost_reference, "aplot_cost", forbidden)
    monkeypatch.setattr(sinkhorn_reference, "solve", forbidden)
    for call in (
        lambda: aplot_margin(*loss_args(), eps=0.0, backend="torch"),
        lambda: aplot_margin(*loss_args(), n_iters=0, backend="torch"),
        lambda: aplot_margin(*loss_args(), backend="nope"),
        lambda: aplot_loss(*loss_args(), eps=-1.0, backend="torch"),
        lambda: aplot_loss(*loss_args(), scale=0.0, n_iters=0),
        lambda: APLOTLoss(backend="torch")(*loss_args(), margin=t(2)),
    ):
        with pytest.raises(ValueError):
            call()
    assert not calls


def _count(checks) -> int:
    """The number of checked values in one read-back (finite checks of CPU tensors may come as one entry)."""
    return sum(len(c.tensors) if isinstance(c, _checks._CpuFinite) else 1 for c in checks)


def test_value_checks_of_one_call_are_read_with_one_synchronisation(monkeypatch):
    """NaN/sign/mass checks of all of a call's tensors are read back together (one host sync)."""
    reads = []
    real_run = _checks._run
    monkeypatch.setattr(_checks, "_run", lambda checks: (reads.append(_count(checks)), real_run(checks))[1])
    n, m = 3, 5
    rc, rr = t(n), t(m) + 0.05
    x, y = t(n, 4), t(m, 4).flip(0)
    a, b = uniform(n), uniform(m)
    expected = [
        (lambda: aplot_margin(rc, rr, x, y, backend="torch"), [4]),  # the cost and Sinkhorn steps add none
        (lambda: aplot_loss(rc, rr, x, y, margin=t(n), backend="torch"), [5]),
        (lambda: APLOTLoss(backend="torch")(rc, rr, x, y), [4]),
        (lambda: bt_loss(rc, rr[:n], t(n)), [3]),
        (lambda: aplot_cost(x, y, rc, rr, backend="torch"), [4]),
        (lambda: cosine_cost(x, y, backend="torch"), [2]),
        (lambda: sinkhorn(t(n, m), backend="torch"), [2]),  # C finite, max|C| / eps; uniform weights: no mass check
        (lambda: sinkhorn(t(n, m), a, b, backend="torch"), [9]),  # C (2); a, b: finite, >= 0, mass > 0; equal masses
    ]
    for call, want in expected:
        reads.clear()
        call()
        assert reads == want


def test_value_checks_can_be_switched_off(monkeypatch):
    """Off, no value is read back (no synchronisation) and bad values go through; shape checks stay."""
    import aplot_kernels

    reads = []  # the number of checks of each read-back (an empty list reads nothing)
    real_run = _checks._run
    monkeypatch.setattr(_checks, "_run", lambda checks: (checks and reads.append(_count(checks)), real_run(checks))[1])
    n, m = 3, 5
    rc, rr, x, y = t(n), t(m) + 0.05, t(n, 4), t(m, 4).flip(0)
    bad = t(n, m)
    bad[0, 0] = float("nan")
    with aplot_kernels.value_checks(False):
        margins = aplot_margin(rc, rr, x, y, backend="torch")
        result = sinkhorn(bad, backend="torch")
        sinkhorn(t(n, m), -uniform(n), uniform(m), backend="torch")  # a negative marginal, unreported
        with pytest.raises(ValueError, match="must be 2-D or 3-D"):
            sinkhorn(t(n), backend="torch")
    assert reads == []
    assert torch.isnan(result.plan).any()
    assert _checks._value_checks_on, "the context restores the setting"
    torch.testing.assert_close(margins, aplot_margin(rc, rr, x, y, backend="torch"))
    assert reads == [4]
    previous = aplot_kernels.set_value_checks(False)
    try:
        assert previous is True
        bt_loss(rc, rr[:n], t(n))
        assert reads == [4]
    finally:
        aplot_kernels.set_value_checks(previous)
    with pytest.raises(ValueError, match="NaN or inf"):
        sinkhorn(bad, backend="torch")


def test_deferred_checks_report_the_first_failure_and_overflow_is_not_nan():
    C = t(2, 3, 4)
    C[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`C`"):  # C is checked before `a`, which is also bad
        sinkhorn(C, -t(2, 3), backend="torch")
    with pytest.raises(ValueError, match="`b` must be non-negative"):
        sinkhorn(t(2, 3, 4), None, -t(2, 4), backend="torch")
    # Finite values whose sum overflows are not NaN/inf: the exact check overrules.
    big = torch.full((2, 8), 3e38, dtype=torch.float32, device=DEVICE)
    assert not bool(torch.isfinite(big.sum()))
    cosine_cost(big, backend="torch")
    # Half-precision values are summed in float32: a sum past float16's range is no false alarm.
    half = torch.full((2, 8), 60000.0, dtype=torch.float16, device=DEVICE)
    assert not bool(torch.isfinite(half.sum()))
    assert torch.isfinite(cosine_cost(half, backend="torch")).all()


def test_value_checks_cost_one_reduction_per_tensor_and_one_stack(monkeypatch):
    """On a GPU each op of a check is a launch (microseconds), so the finiteness of a block's small tensors
    costs one concatenation and one reduction, a large tensor one reduction of its own, and the read-back
    one stack (none for a single value): the tests of the values run on the host. (CPU tensors take the
    extension's one-call check when it is loaded: the test below; here that is switched off.)"""
    monkeypatch.setattr(_checks, "_cpu_finite_op", lambda: None)
    gen = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)
        for shape, dtype in (((7,), torch.float32), ((5, 3), torch.bfloat16), ((2, 9), torch.float16))
    ]
    with DeviceOps() as recorded:
        with _checks.one_sync():
            for i, x in enumerate(tensors):
                _checks.tensor(f"x{i}", x, ndims=(1, 2))
    assert recorded.ops == ["aten.cat", "aten.sum", "aten._local_scalar_dense"]
    large = torch.randn(_checks.GROUP_MAX_NUMEL + 1, generator=gen).to(DEVICE)
    with DeviceOps() as recorded:
        with _checks.one_sync():
            for i, x in enumerate(tensors[:2] + [large]):
                _checks.tensor(f"x{i}", x, ndims=(1, 2))
    assert recorded.ops == ["aten.cat", "aten.sum", "aten.sum", "aten.stack"]
    margin_args = loss_args(5, 7)
    with DeviceOps() as recorded:
        aplot_margin(*margin_args, backend="torch", n_iters=1)
    # then the cost: no check after the read-back
    assert recorded.ops[:3] == ["aten.cat", "aten.sum", "aten._local_scalar_dense"]
    cost = tensors[1].float()
    with DeviceOps() as recorded:  # C: one reduction for its finiteness and its magnitude (max|C| / eps)
        sinkhorn(cost, n_iters=1, backend="torch")
    before_read_back = recorded.ops[: recorded.ops.index("aten.stack")]
    assert [op for op in before_read_back if op != "aten.full"] == ["aten.linalg_vector_norm"]  # full: uniform a, b


@pytest.mark.skipif(not aplot_kernels.backends.native_status(torch.device("cpu"))[0], reason="native extension unavailable")
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", None])
def test_cpu_value_checks_are_one_extension_call(bad):
    """With the extension loaded, the finiteness of every CPU tensor of a block is one call of its
    ``first_nonfinite`` op (no reduction tensors, no read-back), whatever the dtypes, layouts and sizes,
    and a failure names the first non-finite argument."""
    gen = torch.Generator().manual_seed(11)
    tensors = {
        "x0": torch.randn(7, generator=gen),
        "x1": torch.randn(9, 5, generator=gen, dtype=torch.float64).t(),  # not contiguous
        "x2": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "x3": torch.randn(2, 9, generator=gen).to(torch.float16),
        "x4": torch.randn(3 * _checks.GROUP_MAX_NUMEL + 7, generator=gen),  # large: split over threads
    }
    names = list(tensors)
    rng = np.random.default_rng(abs(hash(bad)) % 1000)
    spoiled = sorted(rng.choice(len(names), size=2, replace=False)) if bad else []
    for index in spoiled:
        flat = tensors[names[index]].reshape(-1) if tensors[names[index]].is_contiguous() else None
        if flat is not None:
            flat[rng.integers(flat.numel())] = float(bad)
        else:
            tensors[names[index]][1, 2] = float(bad)
    aplot_kernels.backends.resolve("native", torch.device("cpu"), torch.float32)  # loads the extension
    with DeviceOps() as recorded:
        if spoiled:
            with pytest.raises(ValueError, match=f"`{names[spoiled[0]]}` contains NaN or inf"):
                with _checks.one_sync():
                    for name, x in tensors.items():
                        _checks.tensor(name, x, ndims=(1, 2))
        else:
            with _checks.one_sync():
                for name, x in tensors.items():
                    _checks.tensor(name, x, ndims=(1, 2))
    assert recorded.ops[0] == "aplot_kernels.first_nonfinite"
    if not spoiled:
        assert recorded.ops == ["aplot_kernels.first_nonfinite"]
    for name, x in tensors.items():  # the op agrees with torch on each tensor alone
        assert (torch.ops.aplot_kernels.first_nonfinite([x]) == 0) == (not bool(torch.isfinite(x).all())), name


def test_value_checks_read_back_mixed_dtypes_exactly():
    """Checked values of several dtypes are read back together in float64, which holds each exactly
    (in float32 a positive total mass of 1e-300 would read as 0)."""
    values = [
        torch.tensor(1e-300, dtype=torch.float64),
        torch.tensor(0.1, dtype=torch.float32),
        torch.tensor(-0.5, dtype=torch.bfloat16),
        torch.tensor(7.0, dtype=torch.float16),
    ]
    assert _checks._read_back([v.to(DEVICE) for v in values]) == [v.item() for v in values]
    C = t(1, 3, 4)  # float32 cost, bfloat16 weights: one read-back of both
    with pytest.raises(ValueError, match="`a` must be non-negative"):
        sinkhorn(
            C, torch.tensor([0.5, 0.75, -0.25], dtype=torch.bfloat16, device=DEVICE), uniform(4, torch.bfloat16), backend="torch"
        )


# ---------------------------------------------------------------------------
# Inputs are never modified in place
# ---------------------------------------------------------------------------


def _assert_untouched(inputs, snapshot):
    for name, (x, before) in enumerate(zip(inputs, snapshot)):
        assert torch.equal(x.detach(), before), f"input {name} was modified"


def _leaves(*tensors, dtype=torch.float64):
    return [x.to(dtype).requires_grad_() for x in tensors]


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
@pytest.mark.parametrize("grad", ["envelope", "implicit", "unrolled", "none"])
def test_sinkhorn_leaves_inputs_untouched(backend, grad):
    if grad == "unrolled" and backend != "torch":
        pytest.skip("unrolled runs on the torch backend only")
    dtype = widest_dtype(backend)
    C = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(DEVICE)
    a = torch.tensor([0.1, 0.0, 0.3, 0.2, 0.4], dtype=torch.float64, device=DEVICE)
    b = torch.tensor([0.25, 0.25, 0.5, 0.0], dtype=torch.float64, device=DEVICE).expand(2, 4)
    inputs = _leaves(C, a, b, dtype=dtype) if grad != "none" else [C.to(dtype), a.to(dtype), b.to(dtype)]
    snapshot = [x.detach().clone() for x in inputs]
    r = sinkhorn(*inputs, eps=0.1, n_iters=20, tol=1e-4, check_every=3, grad=grad, backend=backend)
    if grad != "none":
        out = r.reg_cost.sum() if grad == "envelope" else r.reg_cost.sum() + (r.plan * r.plan).sum() + r.f.sum()
        out.backward()
    _assert_untouched(inputs, snapshot)


@pytest.mark.parametrize("backend", [b for b in SINKHORN_BACKENDS if b in COST_BACKENDS])
def test_costs_and_losses_leave_inputs_untouched(backend):
    g = torch.Generator().manual_seed(1)
    dtype = widest_dtype(backend)
    rc, rr, ce, re = (torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype) for s in ((4,), (5,), (4, 6), (5, 6)))
    ce[2] = 0.0  # a zero vector takes the clamped-norm path
    margin = torch.rand(4, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    inputs = _leaves(rc, rr, ce, re, dtype=dtype)
    snapshot = [x.detach().clone() for x in inputs] + [margin.clone()]
    aplot_cost(inputs[2], inputs[3], inputs[0], inputs[1], backend=backend).sum().backward()
    cosine_cost(inputs[2], inputs[3], backend=backend).sum().backward()
    cosine_cost(inputs[2], backend=backend).sum().backward()
    aplot_loss(*inputs, margin, detach=False, backend=backend).backward()
    APLOTLoss(backend=backend)(*inputs, margin).backward()
    bt_loss(inputs[0], inputs[1][:4], margin).backward()
    _assert_untouched(inputs + [margin], snapshot)
