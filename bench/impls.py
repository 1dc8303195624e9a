"""The implementations compared, one adapter each.

Every adapter turns a :class:`~bench.cases.Case` and its input sets into a
:class:`Runner`: ``call(inp)`` is what is timed (including the library's own
argument handling, as a user would call it); ``extract(out, inp)`` turns its
output into a :class:`Probe` (main output, plan, iterations) for the accuracy
columns, untimed.

Names (the ``impl`` column):

* ``ours-torch``: this library with ``backend="torch"``: the plain PyTorch
  implementation (batched, log domain, POT's update order). It doubles as the
  "plain PyTorch" baseline: there is no separate hand-written torch loop.
* ``ours-triton``, ``ours-native``: the kernel backends, whenever
  ``aplot_kernels.available_backends(device)`` lists them (``triton`` is never
  timed on the CPU: the interpreter's timings mean nothing).
* ``pot-batch-torch`` / ``pot-batch-numpy``: ``ot.batch.solve_batch(M, reg, a, b,
  max_iter=K, tol=0 or tol, method="log_sinkhorn")`` on torch tensors / numpy arrays.
  ``pot-batch-torch`` on the same device and dtype is the ``speedup_vs_pot`` baseline.
* ``pot-loop-torch`` / ``pot-loop-numpy``: ``ot.sinkhorn(a, b, M_i, reg,
  method="sinkhorn_log")`` once per problem in a Python loop.
* ``pot-dist-torch`` / ``pot-dist-numpy``: ``ot.dist(x_i, y_i, metric="cosine")`` per
  problem (cost ops; ``pot-dist-torch`` is their speed-up baseline).
* ``geomloss``: ``geomloss.SamplesLoss("sinkhorn", p=2, blur=sqrt(eps), scaling=0.9,
  potentials=True, debias=False)`` on the unit vectors (its cost ``|x - y|^2 / 2``
  equals the cosine cost), ``sinkhorn_tol`` only. It anneals ``eps`` and stops
  at an accuracy of its own, usually far above ``tol``; so that it is compared
  at equal accuracy, ``ours-<backend>@geomloss-err`` rows run our solver with
  ``tol`` set to the marginal error GeomLoss reached on the same input.
* ``flashsinkhorn``: ``flash_sinkhorn.SamplesLoss(backend="alternating",
  half_cost=True, use_epsilon_scaling=False, eps, n_iters)`` on CUDA.
* ``ott-jax``: ``ott`` ``Sinkhorn`` on a ``Geometry(cost_matrix=C)``, ``jax.vmap``-ed over the batch.
* ``bt_loss``: the Bradley-Terry loss alone (loss ops), for scale.

A library that is not installed is skipped with a note, never an error.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

import aplot_kernels as ak

from . import cases as C_
from .cases import Case
from .measure import column_violation


class Probe(NamedTuple):
    output: object  # compared with the float64 reference's output (None: no plan_err)
    plan: object = None  # [B, N, M] or [N, M]; None: no marginal_err
    n_iters: Optional[float] = None  # iterations run (largest over the batch)


class Runner(NamedTuple):
    inputs: Sequence  # prepared input sets, rotated by the timer
    call: Callable  # call(inp) -> out, timed
    extract: Callable  # extract(out, inp) -> Probe, untimed
    note: str = ""


class Unavailable(Exception):
    """This implementation cannot run this case (missing library, device, dtype): a note, not an error."""


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def version_of(module: str) -> str:
    if not installed(module):
        return ""
    try:
        mod = importlib.import_module(module)
    except Exception:
        return "broken"
    return str(getattr(mod, "__version__", "?"))


# ---------------------------------------------------------------- ours


def _ours(backend: str, case: Case, inputs) -> Runner:
    op = case.op
    if op == "cosine_cost":
        return Runner(inputs, lambda i: ak.cosine_cost(i["x"], i["y"], backend=backend), lambda out, i: Probe(out))
    if op == "aplot_cost":

        def call(i):
            return ak.aplot_cost(i["x"], i["y"], i["rc"], i["rr"], alpha=C_.ALPHA, temperature=C_.TEMPERATURE, backend=backend)

        return Runner(inputs, call, lambda out, i: Probe(out))
    if op in C_.SINKHORN_OPS:

        def call(i):
            return ak.sinkhorn(
                i["C"], eps=case.eps, n_iters=case.n_iters, tol=case.tol, check_every=C_.CHECK_EVERY, grad="none", backend=backend
            )

        return Runner(inputs, call, lambda out, i: Probe(out.plan, out.plan, float(out.n_iters.max())))
    if op == "aplot_margin":

        def call(i):
            return ak.aplot_margin(i["rc"], i["rr"], i["x"], i["y"], backend=backend)

        def extract(out, i):
            plan = ak.APLOTLoss(backend=backend)(i["rc"], i["rr"], i["x"], i["y"], return_outputs=True).plan
            return Probe(out, plan, C_.FIXED_ITERS)

        return Runner(inputs, call, extract)
    if op in C_.LOSS_OPS:
        detach = op == "aplot_loss_fwd_bwd"

        def call(i):
            return C_.loss_gradients(i, backend=backend, detach=detach)

        return Runner(inputs, call, lambda out, i: Probe(torch.cat([g.reshape(-1) for g in out])))
    if op in C_.OVERHEAD_OPS:
        return Runner(
            inputs, lambda i: ak.aplot_loss(i["rc"], i["rr"], i["x"], i["y"], backend=backend), lambda out, i: Probe(out)
        )
    raise Unavailable(f"no adapter for {op}")


def _bt_loss(case: Case, inputs) -> Runner:
    if case.op in C_.OVERHEAD_OPS:
        return Runner(inputs, lambda i: ak.bt_loss(i["rc"], i["rr"]), lambda out, i: Probe(None))
    if case.op not in C_.LOSS_OPS:
        raise Unavailable("bt_loss is only a loss")
    return Runner(inputs, lambda i: C_.loss_gradients(i, backend="torch", detach=True, bt_only=True), lambda out, i: Probe(None))


# ---------------------------------------------------------------- POT


def _pot_inputs(case: Case, inputs, numpy: bool) -> List[Dict]:
    """POT's inputs: the cost (and embeddings) with uniform weights, as torch tensors or numpy arrays."""
    out = []
    for inp in inputs:
        a, b = C_.uniform_weights(case, dtype=inp["x"].dtype)
        item = dict(inp, a=a, b=b)
        if numpy:
            if inp["x"].dtype != torch.float32:
                raise Unavailable("numpy runs float32 only here")
            item = {k: v.cpu().numpy() for k, v in item.items()}
        out.append(item)
    return out


def _pot(kind: str, numpy: bool, case: Case, inputs) -> Runner:
    if not installed("ot"):
        raise Unavailable("POT is not installed")
    import ot
    import ot.batch

    if numpy and case.device != "cpu":
        raise Unavailable("numpy runs on the CPU")
    prepared = _pot_inputs(case, inputs, numpy)
    op, eps = case.op, case.eps
    stop = 0.0 if case.tol is None else case.tol
    as_tensor = (lambda arrays: np.stack(arrays)) if numpy else (lambda ts: torch.stack(ts))

    if kind == "dist":
        if op != "cosine_cost":
            raise Unavailable("ot.dist has no APLOT cost")

        def call(i):
            return as_tensor([ot.dist(i["x"][k], i["y"][k], metric="cosine") for k in range(case.B)])

        return Runner(prepared, call, lambda out, i: Probe(out))

    if op in C_.SINKHORN_OPS:
        if kind == "batch":

            def call(i):
                res = ot.batch.solve_batch(
                    i["C"], eps, i["a"], i["b"], max_iter=case.n_iters, tol=stop, method="log_sinkhorn", grad="detach"
                )
                return res.plan, res.log["n_iter"] + 1

            return Runner(prepared, call, lambda out, i: Probe(out[0], out[0], float(out[1])))

        def call(i):
            plans, iters = [], 0
            for k in range(case.B):
                plan, log = ot.sinkhorn(
                    i["a"][k], i["b"][k], i["C"][k], eps, method="sinkhorn_log", numItermax=case.n_iters, stopThr=stop, log=True
                )
                plans.append(plan)
                iters = max(iters, int(log["niter"]) + 1)
            return as_tensor(plans), iters

        return Runner(prepared, call, lambda out, i: Probe(out[0], out[0], float(out[1])))

    if op == "aplot_margin" and not numpy:
        n = case.N

        def call(i):
            cost = ak.aplot_cost(i["x"], i["y"], i["rc"], i["rr"], alpha=C_.ALPHA, temperature=C_.TEMPERATURE, backend="torch")
            a, b = i["a"][0].to(cost.dtype), i["b"][0].to(cost.dtype)
            if kind == "batch":
                plan = ot.batch.solve_batch(
                    cost[None], eps, a[None], b[None], max_iter=C_.FIXED_ITERS, tol=0.0, method="log_sinkhorn", grad="detach"
                ).plan[0]
            else:
                plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=C_.FIXED_ITERS, stopThr=0.0)
            return n * (plan * cost).sum(-1), plan

        return Runner(
            prepared,
            call,
            lambda out, i: Probe(out[0], out[1], C_.FIXED_ITERS),
            note="cost by aplot_kernels backend=torch, Sinkhorn by POT",
        )
    raise Unavailable(f"POT {kind} has no {op}")


# ---------------------------------------------------------------- GeomLoss, FlashSinkhorn, OTT-JAX


def _plan_from_potentials(C, a, b, f, g, eps):
    """GeomLoss convention: ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``."""
    C, f, g = C.float(), f.float().reshape(a.shape), g.float().reshape(b.shape)
    return a[..., :, None] * b[..., None, :] * torch.exp((f[..., :, None] + g[..., None, :] - C) / eps)


def _first_reaching(case: Case, inp, settings, run: Callable) -> Tuple[object, str]:
    """The cheapest setting whose plan reaches ``case.tol`` (the ``equal accuracy`` rule)."""
    a, b = C_.uniform_weights(case)
    err = math.inf
    for s in settings:
        err = column_violation(run(s, inp), b)
        if err <= case.tol:
            return s, f"setting {s} (first to reach tol)"
    return settings[-1], f"setting {settings[-1]} did not reach tol (err {err:.2g})"


GEOMLOSS_SCALING = 0.9  # eps annealing ratio; GeomLoss's default is 0.5


def _geomloss_solver(case: Case):
    """``solve(inp) -> plan`` with GeomLoss's public ``SamplesLoss`` on the unit vectors."""
    if not installed("geomloss"):
        raise Unavailable("geomloss is not installed")
    if case.op != "sinkhorn_tol":
        raise Unavailable("geomloss anneals eps (no fixed iteration count): compared in sinkhorn_tol only")
    from geomloss import SamplesLoss

    a, b = C_.uniform_weights(case)
    loss = SamplesLoss(
        "sinkhorn", p=2, blur=math.sqrt(case.eps), scaling=GEOMLOSS_SCALING, debias=False, potentials=True, backend="tensorized"
    )

    def solve(i):
        f, g = loss(a.to(i["x"].dtype), i["x"], b.to(i["y"].dtype), i["y"])
        return _plan_from_potentials(i["C"], a, b, f, g, case.eps)

    return solve


def _geomloss(case: Case, inputs) -> Runner:
    solve = _geomloss_solver(case)
    return Runner(
        inputs,
        solve,
        lambda plan, i: Probe(plan, plan),
        note=f"eps annealing, scaling {GEOMLOSS_SCALING}: stops at its own accuracy (see marginal_err and the ours-*@geomloss-err rows)",
    )


_geomloss_reached: Dict[Case, float] = {}  # the current case's GeomLoss marginal error (inputs are seeded per case)


def _ours_at_geomloss_accuracy(backend: str, case: Case, inputs) -> Runner:
    """Our solver stopped at the marginal error GeomLoss reaches on the same input: equal accuracy."""
    if case not in _geomloss_reached:
        _, b = C_.uniform_weights(case)
        _geomloss_reached.clear()
        _geomloss_reached[case] = column_violation(_geomloss_solver(case)(inputs[0]), b)
    tol = max(_geomloss_reached[case], case.tol)

    def call(i):
        return ak.sinkhorn(i["C"], eps=case.eps, n_iters=case.n_iters, tol=tol, check_every=1, grad="none", backend=backend)

    return Runner(
        inputs,
        call,
        lambda out, i: Probe(out.plan, out.plan, float(out.n_iters.max())),
        note=f"tol {tol:.3g} = the marginal error GeomLoss reached; checked every iteration",
    )


def _flashsinkhorn(case: Case, inputs) -> Runner:
    if not installed("flash_sinkhorn"):
        raise Unavailable("flash-sinkhorn is not installed")
    if case.device != "cuda":
        raise Unavailable("flash-sinkhorn runs on CUDA")
    if case.op not in C_.SINKHORN_OPS:
        raise Unavailable("flash-sinkhorn solves point clouds only")
    from flash_sinkhorn import SamplesLoss

    a, b = C_.uniform_weights(case)

    def solve(threshold, i):
        loss = SamplesLoss(
            "sinkhorn",
            backend="alternating",
            half_cost=True,
            use_epsilon_scaling=False,
            eps=case.eps,
            n_iters=case.n_iters,
            threshold=threshold,
            inner_iterations=C_.CHECK_EVERY,
            debias=False,
            potentials=True,
        )
        return loss(a, i["x"], b, i["y"])

    def plan_of(out, i):
        return _plan_from_potentials(i["C"], a, b, out[0], out[1], case.eps)

    threshold, note = None, "fixed iterations; GeomLoss potentials convention"
    if case.tol is not None:
        threshold, note = _first_reaching(case, inputs[0], (1e-3, 1e-4, 1e-5, 1e-6, 1e-7), lambda s, i: plan_of(solve(s, i), i))
        note = f"threshold: {note}"
    return Runner(inputs, lambda i: solve(threshold, i), lambda out, i: Probe(plan_of(out, i), plan_of(out, i)), note=note)


def _ott(case: Case, inputs) -> Runner:
    if not (installed("ott") and installed("jax")):
        raise Unavailable("ott-jax is not installed")
    if case.op not in C_.SINKHORN_OPS:
        raise Unavailable("ott-jax: Sinkhorn ops only")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU memory to torch
    import jax
    import jax.numpy as jnp
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    threshold = -1.0 if case.tol is None else case.tol  # -1: never converged, runs all iterations
    solver = sinkhorn.Sinkhorn(
        threshold=threshold,
        max_iterations=case.n_iters,
        min_iterations=case.n_iters if case.tol is None else 0,
        inner_iterations=C_.CHECK_EVERY if case.n_iters % C_.CHECK_EVERY == 0 else 1,
    )

    def solve_one(cost):
        out = solver(linear_problem.LinearProblem(geometry.Geometry(cost_matrix=cost, epsilon=case.eps)))
        return out.matrix, out.n_iters

    solve = jax.jit(jax.vmap(solve_one))
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[case.dtype]
    prepared = [jnp.asarray(i["C"].float().cpu().numpy(), dtype=jdtype) for i in inputs]

    def call(cost):
        plan, iters = solve(cost)
        plan.block_until_ready()
        return plan, iters

    return Runner(
        prepared,
        call,
        lambda out, i: Probe(np.asarray(out[0]), np.asarray(out[0]), float(np.max(out[1]))),
        note=f"jax device {jax.devices()[0].platform}",
    )


# ---------------------------------------------------------------- registry


def _make_ours(backend):
    return lambda case, inputs: _ours(backend, case, inputs)


def _make_ours_at_geomloss(backend):
    return lambda case, inputs: _ours_at_geomloss_accuracy(backend, case, inputs)


def _make_pot(kind, numpy):
    return lambda case, inputs: _pot(kind, numpy, case, inputs)


EXTERNAL = {
    "pot-batch-torch": _make_pot("batch", False),
    "pot-batch-numpy": _make_pot("batch", True),
    "pot-loop-torch": _make_pot("loop", False),
    "pot-loop-numpy": _make_pot("loop", True),
    "pot-dist-torch": _make_pot("dist", False),
    "pot-dist-numpy": _make_pot("dist", True),
    "geomloss": _geomloss,
    "flashsinkhorn": _flashsinkhorn,
    "ott-jax": _ott,
    "bt_loss": _bt_loss,
}

# Which implementations each op lists (ours-* are added for every op).
OP_IMPLS = {
    "cosine_cost": ("pot-dist-torch", "pot-dist-numpy"),
    "aplot_cost": (),
    "sinkhorn_fixed": ("pot-batch-torch", "pot-batch-numpy", "pot-loop-torch", "pot-loop-numpy", "flashsinkhorn", "ott-jax"),
    "sinkhorn_tol": (
        "pot-batch-torch",
        "pot-batch-numpy",
        "pot-loop-torch",
        "pot-loop-numpy",
        "geomloss",
        "flashsinkhorn",
        "ott-jax",
    ),
    "aplot_margin": ("pot-batch-torch", "pot-loop-torch"),
    "aplot_loss_fwd_bwd": ("bt_loss",),
    "aplot_loss_implicit_fwd_bwd": ("bt_loss",),
    "aplot_loss_overhead": ("bt_loss",),
}

# The POT row each op's speed-up is measured against (same op, shape, dtype, device).
POT_BASELINE = {
    "cosine_cost": "pot-dist-torch",
    "sinkhorn_fixed": "pot-batch-torch",
    "sinkhorn_tol": "pot-batch-torch",
    "aplot_margin": "pot-batch-torch",
}


def our_backends(device: str) -> List[str]:
    """The backends this library reports for ``device``, minus the Triton interpreter on the CPU."""
    names = list(ak.available_backends(device))
    if device == "cpu" and "triton" in names:
        names.remove("triton")
    return names


def implementations(op: str, device: str) -> Dict[str, Callable]:
    """``{impl name: factory(case, inputs) -> Runner}`` for ``op`` on ``device``."""
    ours = our_backends(device)
    impls = {f"ours-{b}": _make_ours(b) for b in ours}
    impls.update({name: EXTERNAL[name] for name in OP_IMPLS[op]})
    if "geomloss" in impls:
        impls.update({f"ours-{b}@geomloss-err": _make_ours_at_geomloss(b) for b in ours})
    return impls


def build(factory, case: Case, inputs) -> Runner:
    """Prepare a runner; warnings of foreign libraries (convergence etc.) are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory(case, inputs)
