"""What is benchmarked: the ops, the shape matrix per device, inputs and float64 references.

Ops (``Case.op``):

* ``cosine_cost``: ``cosine_cost(x [B,N,D], y [B,M,D]) -> [B,N,M]``.
* ``aplot_cost``: ``aplot_cost`` on the same shapes plus rewards ``[B,N]``, ``[B,M]``.
* ``sinkhorn_fixed``: Sinkhorn on a cost ``[B,N,M]`` for exactly ``n_iters`` iterations.
* ``sinkhorn_tol``: Sinkhorn until the L1 column-marginal violation is ``<= tol``
  (checked every 10 iterations, capped at ``n_iters``); its ``plan_err`` is
  against a float64 reference run to ``REFERENCE_TOL``.
* ``aplot_margin``: the APLOT margins of ``n = N`` pairs with ``D``-wide embeddings (``B = 1``).
* ``aplot_loss_fwd_bwd``: ``aplot_loss`` forward and backward (default ``detach=True``:
  gradients reach the rewards), next to ``bt_loss`` on the same rewards.
* ``aplot_loss_implicit_fwd_bwd``: the same with ``detach=False`` (gradients through
  the cost and the plan by implicit differentiation, reaching the embeddings too).
* ``aplot_loss_overhead``: one eager ``aplot_loss`` call (forward, defaults, value checks
  on) at a size where the Python and dispatch overhead dominates (16 pairs, ``D = 64``),
  next to one ``bt_loss`` call on the same rewards.

Sinkhorn ops draw their costs as the cosine cost of unit vectors in ``D = 8``
dimensions: the costs then spread over ``[0, 2]`` like those of real
embeddings, and point-cloud solvers (GeomLoss, FlashSinkhorn) can solve the
same problem, since ``1 - <x, y> = |x - y|^2 / 2`` for unit vectors.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import aplot_kernels as ak

OPS = (
    "cosine_cost",
    "aplot_cost",
    "sinkhorn_fixed",
    "sinkhorn_tol",
    "aplot_margin",
    "aplot_loss_fwd_bwd",
    "aplot_loss_implicit_fwd_bwd",
    "aplot_loss_overhead",
)
SINKHORN_OPS = ("sinkhorn_fixed", "sinkhorn_tol")
COST_OPS = ("cosine_cost", "aplot_cost")
LOSS_OPS = ("aplot_loss_fwd_bwd", "aplot_loss_implicit_fwd_bwd")
OVERHEAD_OPS = ("aplot_loss_overhead",)
OVERHEAD_SHAPE = ("aplot_loss_overhead", 1, 16, 16, 64)

SINKHORN_POINT_DIM = 8
FIXED_ITERS, FIXED_EPS = 50, 0.1  # aplot_margin's defaults
TOL, TOL_EPS, TOL_CAP, CHECK_EVERY = 1e-5, 0.05, 1000, 10
REFERENCE_TOL, REFERENCE_CAP = 1e-7, 5000  # "converged" float64 reference of sinkhorn_tol
ALPHA, TEMPERATURE = 0.9, 1.0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Case:
    """One point of the matrix: an op at one shape and dtype on one device."""

    op: str
    B: int
    N: int
    M: int
    D: int
    dtype: str
    device: str
    eps_override: Optional[float] = None  # the issue-level target shapes fix their own eps and K
    iters_override: Optional[int] = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def eps(self) -> float:
        if self.eps_override is not None:
            return self.eps_override
        return TOL_EPS if self.op == "sinkhorn_tol" else FIXED_EPS

    @property
    def n_iters(self) -> int:
        """Iterations (``sinkhorn_tol``: the cap); 0 for ops without Sinkhorn."""
        if self.op in COST_OPS:
            return 0
        if self.iters_override is not None:
            return self.iters_override
        return TOL_CAP if self.op == "sinkhorn_tol" else FIXED_ITERS

    @property
    def tol(self) -> Optional[float]:
        return TOL if self.op == "sinkhorn_tol" else None

    @property
    def work(self) -> float:
        """A size measure for ordering and skipping (larger is slower, within one op)."""
        if self.op in COST_OPS:
            return self.B * self.N * self.M * self.D
        return self.B * self.N * self.M * (1 + self.D / 256)

    def family(self) -> Tuple:
        """Cases that differ only in ``N = M`` form one line of a plot."""
        return (self.op, self.dtype, self.B, self.D, self.eps, self.n_iters)


def _batched(op, sizes, B, D):
    return [(op, B, n, n, D) for n in sizes]


def _aplot(op, sizes, dims):
    return [(op, 1, n, n, d) for d, n in itertools.product(dims, sizes)]


# The CPU speed targets of the native backend (float32, uniform marginals, eps=0.05),
# measured in the full CPU run beside the reference and POT.
CPU_TARGETS = [
    ("sinkhorn_fixed", 64, 64, 64, SINKHORN_POINT_DIM, dict(eps_override=0.05, iters_override=50)),
    ("sinkhorn_fixed", 8, 256, 256, SINKHORN_POINT_DIM, dict(eps_override=0.05, iters_override=50)),
    ("sinkhorn_fixed", 1, 1024, 1024, SINKHORN_POINT_DIM, dict(eps_override=0.05, iters_override=50)),
    ("sinkhorn_fixed", 256, 24, 31, SINKHORN_POINT_DIM, dict(eps_override=0.05, iters_override=100)),
    ("aplot_margin", 1, 512, 512, 1024, {}),
]


def is_cpu_target(case: "Case") -> bool:
    return any(
        (case.op, case.B, case.N, case.M, case.D) == (op, B, N, M, D)
        and case.eps_override == o.get("eps_override")
        and case.iters_override == o.get("iters_override")
        for op, B, N, M, D, o in CPU_TARGETS
    )


def shape_matrix(device: str, quick: bool) -> List[Tuple[str, int, int, int, int]]:
    """``(op, B, N, M, D)`` for every op, smallest first within each op.

    The CPU matrix is capped so that the full run stays within about ten
    minutes on two cores; the GPU matrix reaches ``N = M = 4096``.
    """
    p = SINKHORN_POINT_DIM
    if quick:
        shapes = []
        for op in COST_OPS:
            shapes += _batched(op, [32], 4, 64) + _aplot(op, [128], [768])
        shapes += _batched("sinkhorn_fixed", [32], 4, p) + _batched("sinkhorn_fixed", [128], 1, p)
        shapes += _batched("sinkhorn_tol", [32], 4, p)
        shapes += _aplot("aplot_margin", [64], [768])
        for op in LOSS_OPS:
            shapes += _aplot(op, [64], [768])
        return shapes + [OVERHEAD_SHAPE]
    small = [32, 64, 128, 256]
    if device == "cuda":
        large, pairs, dims = [512, 1024, 2048, 4096], [64, 256, 1024, 4096], [768, 2048, 4096]
        tol_small, tol_large = small, large
    else:
        large, pairs, dims = [512, 1024, 2048], [64, 256, 1024, 2048], [768, 4096]
        tol_small, tol_large = small[:3], [1024]
    shapes = []
    for op in COST_OPS:
        shapes += _batched(op, small, 64, 768) + _aplot(op, pairs, dims)
    shapes += _batched("sinkhorn_fixed", small, 64, p) + _batched("sinkhorn_fixed", large, 1, p)
    shapes += _batched("sinkhorn_tol", tol_small, 64, p) + _batched("sinkhorn_tol", tol_large, 1, p)
    shapes += _aplot("aplot_margin", pairs, dims)
    loss_pairs = pairs if device == "cuda" else pairs[:3]
    shapes += _aplot("aplot_loss_fwd_bwd", loss_pairs, dims)
    shapes += _aplot("aplot_loss_implicit_fwd_bwd", loss_pairs, dims[:1])
    shapes.append(OVERHEAD_SHAPE)
    if device == "cpu":
        shapes += CPU_TARGETS
    return shapes


def default_dtypes(device: str, quick: bool) -> List[str]:
    if device == "cuda":
        return ["float32", "bfloat16"] if quick else ["float32", "bfloat16", "float16"]
    return ["float32"]


def cases(device: str, quick: bool, ops=None, dtypes=None) -> List[Case]:
    dtypes = dtypes or default_dtypes(device, quick)
    out = []
    for op, B, N, M, D, *overrides in shape_matrix(device, quick):
        if ops and op not in ops:
            continue
        out += [Case(op, B, N, M, D, dt, device, **(overrides[0] if overrides else {})) for dt in dtypes]
    order = {op: i for i, op in enumerate(OPS)}
    return sorted(out, key=lambda c: (order[c.op], c.dtype != "float32", c.dtype, c.work))


# ---------------------------------------------------------------- inputs


def make_inputs(case: Case, count: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``count`` independent input sets for ``case`` (tensors on its device, in its dtype).

    Keys: ``x``, ``y`` (embeddings; unit vectors for Sinkhorn ops), ``rc``, ``rr``
    (rewards), ``C`` (Sinkhorn ops: the cost, computed in float32 then cast).
    """
    gen = torch.Generator().manual_seed(seed)
    device, dtype = torch.device(case.device), case.torch_dtype
    sets = []
    for _ in range(count):
        x = torch.randn(case.B, case.N, case.D, generator=gen)
        y = torch.randn(case.B, case.M, case.D, generator=gen)
        rc = torch.randn(case.B, case.N, generator=gen)
        rr = torch.randn(case.B, case.M, generator=gen)
        if case.op in SINKHORN_OPS:
            x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
            inp = {"x": x, "y": y, "C": ak.cosine_cost(x, y, backend="torch")}
        elif case.B == 1 and case.op not in COST_OPS:
            inp = {"x": x[0], "y": y[0], "rc": rc[0], "rr": rr[0]}
        else:
            inp = {"x": x, "y": y, "rc": rc, "rr": rr}
        sets.append({k: v.to(device=device, dtype=dtype) for k, v in inp.items()})
    return sets


def uniform_weights(case: Case, device=None, dtype=torch.float32):
    device = device or torch.device(case.device)
    a = torch.full((case.B, case.N), 1.0 / case.N, device=device, dtype=dtype)
    b = torch.full((case.B, case.M), 1.0 / case.M, device=device, dtype=dtype)
    return a, b


# ---------------------------------------------------------------- references


class Reference:
    """Float64 torch-reference outputs on one input set (what ``plan_err`` compares against)."""

    def __init__(self, output: Optional[torch.Tensor], plan: Optional[torch.Tensor] = None):
        self.output, self.plan = output, plan


def loss_gradients(inp, *, backend: str, detach: bool, dtype=None, bt_only: bool = False):
    """Run a loss forward and backward; return the gradients that flow (rewards, then embeddings)."""
    rc, rr, x, y = (inp[k] if dtype is None else inp[k].to(dtype) for k in ("rc", "rr", "x", "y"))
    rc, rr = rc.detach().requires_grad_(), rr.detach().requires_grad_()
    x, y = x.detach().requires_grad_(not detach), y.detach().requires_grad_(not detach)
    if bt_only:
        loss = ak.bt_loss(rc, rr)
    else:
        loss = ak.aplot_loss(rc, rr, x, y, detach=detach, backend=backend)
    loss.backward()
    grads = [rc.grad, rr.grad]
    if not detach and not bt_only:
        grads += [x.grad, y.grad]
    return grads


def reference(case: Case, inp: Dict[str, torch.Tensor]) -> Reference:
    """The float64 ``torch``-backend result on ``inp`` (upcast: the same input, exact arithmetic)."""
    x64 = {k: v.to(torch.float64) for k, v in inp.items()}
    if case.op == "cosine_cost":
        return Reference(ak.cosine_cost(x64["x"], x64["y"], backend="torch"))
    if case.op == "aplot_cost":
        return Reference(
            ak.aplot_cost(x64["x"], x64["y"], x64["rc"], x64["rr"], alpha=ALPHA, temperature=TEMPERATURE, backend="torch")
        )
    if case.op == "sinkhorn_fixed":
        res = ak.sinkhorn(x64["C"], eps=case.eps, n_iters=case.n_iters, grad="none", backend="torch")
        return Reference(res.plan, res.plan)
    if case.op == "sinkhorn_tol":
        res = ak.sinkhorn(
            x64["C"],
            eps=case.eps,
            n_iters=REFERENCE_CAP,
            tol=REFERENCE_TOL,
            check_every=CHECK_EVERY,
            grad="none",
            backend="torch",
        )
        return Reference(res.plan, res.plan)
    if case.op == "aplot_margin":
        out = ak.APLOTLoss(backend="torch")(x64["rc"], x64["rr"], x64["x"], x64["y"], return_outputs=True)
        return Reference(out.margins, out.plan)
    if case.op in LOSS_OPS:
        grads = loss_gradients(x64, backend="torch", detach=case.op == "aplot_loss_fwd_bwd")
        return Reference(torch.cat([g.reshape(-1) for g in grads]))
    if case.op in OVERHEAD_OPS:
        return Reference(ak.aplot_loss(x64["rc"], x64["rr"], x64["x"], x64["y"], backend="torch"))
    raise ValueError(f"unknown op {case.op!r}")
