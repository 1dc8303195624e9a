"""Shared fixtures: the device, the backends to test, POT reference solves, problem builders.

Every backend runs the same cases. Which backends run depends on this
machine: ``torch`` always, ``native`` when the compiled extension loads,
``triton`` when Triton can run here (on a GPU, or through the interpreter on
the CPU, which this file switches on when there is no GPU). A backend is
tested for an op only once its kernel module for that op exists.

The Triton interpreter is slow and Triton has no float64, so:

* ``small(backend, big, tiny)`` picks a shape or iteration count per backend;
* ``@pytest.mark.float64_only``, ``skip_float64(backend)`` and the
  ``float64_backend`` fixture keep float64 cases on the backends that compute
  float64 (torch; native on the CPU); ``widest_dtype(backend)`` picks float64
  where it can;
* float32 kernel results are held to the float64 ``torch`` reference with the
  float32 bound of docs/contract.md, ``max |plan diff| <= 1e-5 * max plan entry``.

``APLOT_TEST_BACKENDS=native`` (a comma-separated list) restricts a run to
``torch`` and those backends.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import zlib

import torch
import torch.utils._python_dispatch

# The interpreter flag is read when Triton kernels are defined, so it must be
# set before anything imports triton (torch itself does not).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Run from a checkout without installing: make the package importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("aplot_kernels") is None:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from aplot_kernels import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Where an op's kernels for a backend live: a module or package beside the op's dispatch.
KERNEL_MODULES = {"triton": ("triton",), "native": ("native",)}


def _kernel_module_exists(backend: str, op: str) -> bool:
    return any(importlib.util.find_spec(f"aplot_kernels.{op}.{name}") is not None for name in KERNEL_MODULES[backend])


def backends_for(op: str, device: torch.device = DEVICE) -> list:
    """Backends that can run ``op`` (``"cost"`` or ``"sinkhorn"``) on ``device``, ``"torch"`` first."""
    names = ["torch"]
    if backends.native_status(device)[0] and _kernel_module_exists("native", op):
        names.append("native")
    if backends.triton_status(device)[0] and _kernel_module_exists("triton", op):
        names.append("triton")
    return names


def _selected(names: list) -> list:
    """``APLOT_TEST_BACKENDS=torch,native`` restricts the run to those backends (``torch`` is always kept)."""
    wanted = os.environ.get("APLOT_TEST_BACKENDS")
    if not wanted:
        return names
    keep = {"torch"} | {w.strip() for w in wanted.split(",")}
    return [n for n in names if n in keep]


COST_BACKENDS = _selected(backends_for("cost"))
SINKHORN_BACKENDS = _selected(backends_for("sinkhorn"))
# Kernel backends only (compared against the torch reference).
KERNEL_SINKHORN_BACKENDS = [b for b in SINKHORN_BACKENDS if b != "torch"]
KERNEL_COST_BACKENDS = [b for b in COST_BACKENDS if b != "torch"]


def interpreted(backend: str) -> bool:
    """Triton kernels running through the (slow) CPU interpreter."""
    return backend == "triton" and DEVICE.type == "cpu"


def small(backend: str, big, tiny):
    """``tiny`` on the Triton interpreter, ``big`` elsewhere (shapes, iteration counts)."""
    return tiny if interpreted(backend) else big


def has_float64(backend: str, device: torch.device = DEVICE) -> bool:
    """docs/contract.md: float64 runs on the torch backend and the native CPU backend (Triton has none)."""
    return backend == "torch" or (backend == "native" and device.type == "cpu")


def skip_float64(backend: str) -> None:
    """Reference/native only: Triton (and native on a GPU) need not compute float64."""
    if not has_float64(backend):
        pytest.skip(f"float64 case: backend {backend!r} on {DEVICE.type} computes float16/bfloat16/float32 only")


def widest_dtype(backend: str) -> torch.dtype:
    """float64 where the backend computes it, else float32."""
    return torch.float64 if has_float64(backend) else torch.float32


BACKEND_FIXTURES = ("sinkhorn_backend", "cost_backend", "loss_backend", "backend")


def pytest_configure(config):
    config.addinivalue_line("markers", "float64_only: a float64 case; skipped for the backends that compute no float64 (Triton)")


def pytest_runtest_setup(item):
    """``@pytest.mark.float64_only`` skips a test's Triton (and native-on-GPU) parametrisations."""
    if item.get_closest_marker("float64_only") is None or not hasattr(item, "callspec"):
        return
    for name in BACKEND_FIXTURES:
        backend = item.callspec.params.get(name)
        if backend is not None:
            skip_float64(backend)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=SINKHORN_BACKENDS)
def sinkhorn_backend(request) -> str:
    return request.param


@pytest.fixture(params=[b for b in SINKHORN_BACKENDS if has_float64(b)])
def float64_backend(request) -> str:
    """Sinkhorn backends that compute float64 (the POT conformance rows)."""
    return request.param


@pytest.fixture(params=COST_BACKENDS)
def cost_backend(request) -> str:
    return request.param


def seed_for(request) -> int:
    """A stable seed per test (its node id), so failures reproduce."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded per test; draw on the CPU, then move to the device."""
    g = torch.Generator()
    g.manual_seed(seed_for(request))
    return g


# ---------------------------------------------------------------------------
# Problem builders
# ---------------------------------------------------------------------------


def random_cost(gen, batch, n, m, *, scale=1.0, dtype=torch.float64, device=DEVICE):
    """Costs uniform in ``[0, scale]``, ``[B, N, M]``."""
    return (scale * torch.rand(batch, n, m, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)


def random_marginal(gen, batch, size, *, mass=1.0, dtype=torch.float64, device=DEVICE):
    """Positive, non-uniform weights summing to ``mass`` per problem, ``[B, K]``."""
    w = 0.2 + torch.rand(batch, size, generator=gen, dtype=torch.float64)
    return (mass * w / w.sum(-1, keepdim=True)).to(dtype=dtype, device=device)


def random_embeddings(gen, *shape, dtype=torch.float64, device=DEVICE):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------
# POT references
# ---------------------------------------------------------------------------


def pot_sinkhorn_log(C, a, b, eps, n_iters):
    """POT's ``sinkhorn_log`` with exactly ``n_iters`` iterations, one problem: ``(plan, f, g)`` float64 numpy."""
    import warnings

    import ot

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge" is the point of a fixed count
        plan, log = ot.sinkhorn(_np(a), _np(b), _np(C), reg=eps, method="sinkhorn_log", numItermax=n_iters, stopThr=0, log=True)
    return plan, eps * log["log_u"], eps * log["log_v"]


def _np(t):
    return t.detach().to("cpu", torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def to_np(t):
    return _np(t)


def max_abs(x, y) -> float:
    return float(np.abs(_np(x) - _np(y)).max())


def assert_plan_close_relative(plan, reference_plan, bound=1e-5):
    """docs/contract.md, conformance figures, float32 row: ``max |plan diff| <= bound * max plan entry`` (per problem)."""
    plan, reference_plan = _np(plan), _np(reference_plan)
    if plan.ndim == 2:
        plan, reference_plan = plan[None], reference_plan[None]
    for p, r in zip(plan, reference_plan):
        diff = np.abs(p - r).max()
        assert diff <= bound * r.max(), f"max |plan diff| {diff:.3e} > {bound} * max plan {r.max():.3e}"


# FlashAttention's accuracy rule (tests/test_accuracy.py): a kernel's error against float64 may be at
# most ERROR_MULTIPLE times plain PyTorch's error in the same dtype, plus ERROR_FLOOR.
ERROR_MULTIPLE = 3.0
ERROR_FLOOR = 2.5e-7  # about two float32 ulps of the largest entry


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |x - reference| / max |reference|`` in float64."""
    reference = reference.double()
    return float((x.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


def assert_within_rule(kernel_out, torch_out, reference64, what: str) -> None:
    kernel_err, torch_err = relative_error(kernel_out, reference64), relative_error(torch_out, reference64)
    bound = ERROR_MULTIPLE * torch_err + ERROR_FLOOR
    assert kernel_err <= bound, (
        f"{what}: error {kernel_err:.2e} against float64, plain PyTorch's {torch_err:.2e} "
        f"(bound {ERROR_MULTIPLE} x that + {ERROR_FLOOR:.0e})"
    )


def assert_finite(**tensors) -> None:
    for name, t in tensors.items():
        assert t is not None, f"{name} is None"
        assert bool(torch.isfinite(t).all()), f"{name} has NaN or inf"


class DeviceOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that run on tensor data (views and dtype queries launch nothing)."""

    METADATA = ("aten.view", "aten.reshape", "aten._unsafe_view", "aten.unsqueeze", "aten.promote_types")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not str(func).startswith(self.METADATA):
            self.ops.append(str(func).rsplit(".", 1)[0])
        return func(*args, **(kwargs or {}))
