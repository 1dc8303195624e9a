"""The experimental Triton Sinkhorn strategies' own mechanisms (run with ``pytest -m experimental``).

The common cases (fixed iterations, tolerance, padding, strides, half costs)
run for these strategies in test_sinkhorn_triton.py under the same marker; this
file tests what only they have: the scaling domain's fallback to log-domain
iterations, the one-pass strategy's exact column pass, and the cooperative
strategy's programs meeting at barriers (in threads under the interpreter).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import sys
import threading
import time

import pytest
import torch

from triton_cases import DEVICE, TRITON_OK, assert_matches_reference, generator, problem, shrink_tiles

pytestmark = [pytest.mark.experimental, pytest.mark.skipif(not TRITON_OK, reason="Triton unavailable")]

if TRITON_OK:
    from aplot_kernels.sinkhorn import triton as triton_sinkhorn
    from aplot_kernels.sinkhorn.triton.experimental import cooperative, onepass


@pytest.fixture
def small_tiles(monkeypatch):
    shrink_tiles(monkeypatch)


@pytest.mark.parametrize("eps", [0.01, 0.03])
@pytest.mark.parametrize("shift", ["columns", "rows"])
def test_scaling_domain_falls_back_to_log_domain(shift, eps):
    """Costs that make exp(-C / eps) underflow whole columns (or rows): the scaling-domain loop must
    discard those iterations and run them in the log domain (conformance down to eps = 0.01)."""
    gen = generator(53)
    n, m = 21, 18
    C = torch.rand(1, n, m, generator=gen) * 0.2
    ramp = torch.linspace(0.0, 1.8, m if shift == "columns" else n)
    C = C + (ramp[None, None, :] if shift == "columns" else ramp[None, :, None])
    last = C[0, :, -1] if shift == "columns" else C[0, -1]
    if eps == 0.01:  # exp(-C / eps) of the last column (row) is below 2**-126 = exp(-87.3)
        assert last.min().item() / eps > 87.4
    a = torch.rand(1, n, generator=gen) + 0.1
    b = torch.rand(1, m, generator=gen) + 0.1
    a, b = (w / w.sum() for w in (a, b))
    C, a, b = C.to(DEVICE), a.to(DEVICE), b.to(DEVICE)
    for tol in (None, 1e-6):
        out = triton_sinkhorn.solve(C, a, b, eps, 40, tol, 10, strategy="fused-scaling")
        assert_matches_reference(out, C, a, b, eps, 40, tol, 10)


@pytest.mark.parametrize("tol", [None, 1e-4])
def test_onepass_exact_column_pass_when_sums_are_small(tol, small_tiles, monkeypatch):
    """The one-pass strategy's fallback: with the threshold raised above every column sum, each
    v-update comes from the log-sum-exp column pass instead of the row pass's sums; same iterates."""
    import triton.language as tl

    C, a, b = problem(3, 20, 13, torch.float32, seed=89, pad=True)
    C = C * torch.tensor([0.2, 1.0, 3.0], device=DEVICE)[:, None, None]
    summed = triton_sinkhorn.solve(C, a, b, 0.1, 28, tol, 7, strategy="onepass")
    assert_matches_reference(summed, C, a, b, 0.1, 28, tol, 7)
    assert onepass.onepass_parts(3, 20, 2, C.device) > 1
    monkeypatch.setattr(onepass, "ONEPASS_MIN_SUM_K", tl.constexpr(2.0))
    exact = triton_sinkhorn.solve(C, a, b, 0.1, 28, tol, 7, strategy="onepass")
    assert_matches_reference(exact, C, a, b, 0.1, 28, tol, 7)
    torch.testing.assert_close(exact.plan, summed.plan, rtol=0, atol=2e-6 * summed.plan.max().item())
    with pytest.raises(ValueError, match="whole rows"):
        triton_sinkhorn.solve(
            torch.rand(1, 4, 100, device=DEVICE),
            a[:1, :4] * 0 + 0.25,
            torch.full((1, 100), 0.01, device=DEVICE),
            0.1,
            3,
            None,
            10,
            strategy="onepass",
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programs meeting at a barrier run concurrently only on a GPU")
@pytest.mark.skipif(os.environ.get("APLOT_TEST_SKIP_COOPERATIVE") == "1", reason="cooperative smoke check failed on this GPU")
@pytest.mark.parametrize("parts", [2, 3, 7, None])
@pytest.mark.parametrize("tol", [None, 1e-5])
def test_cooperative_parts_match_reference(parts, tol):
    """A problem split over several programs (row and column blocks strided over them) that meet at barriers."""
    C, a, b = problem(3, 75, 52, torch.float32, seed=61, pad=True)
    C = C * torch.tensor([0.3, 1.0, 2.5], device=DEVICE)[:, None, None]  # checks stop the problems at different k
    out = cooperative.solve_cooperative(C, a, b, 0.08, 40, tol, 5, True, parts=parts)
    assert_matches_reference(out, C, a, b, 0.08, 40, tol, 5)
    rows = cooperative.solve_cooperative(C, a, b, 0.08, 40, tol, 5, False, parts=parts)
    torch.testing.assert_close(rows, (out.plan * C).sum(-1), rtol=1e-6, atol=1e-9)


@contextlib.contextmanager
def _interpreter_programs_in_threads(timeout_s: float = 120.0):
    """Run each program of an interpreted launch in its own thread, all at once, as resident GPU programs run.

    The Triton interpreter runs a launch's programs one after another, so
    programs that wait for each other at a barrier would never meet. Here the
    interpreter's grid index becomes per thread and every program gets a
    thread; atomics are the interpreter's own (real host atomics). A launch
    whose programs are still waiting after ``timeout_s`` raises ``TimeoutError``.
    Relies on interpreter internals: skips the test where they differ.
    """
    try:
        from triton.runtime import interpreter as interp

        builder = interp.interpreter_builder
        original_call = interp.GridExecutor.__call__
        needed = (
            interp._patch_lang,
            interp._implicit_cvt,
            interp.GridExecutor._init_args_hst,
            interp.GridExecutor._restore_args_dev,
            builder.set_grid_idx,
            builder.set_grid_dim,
        )
    except AttributeError as exc:
        pytest.skip(f"Triton interpreter internals differ: {exc}")
    assert all(needed)
    builder_type = type(builder)
    per_thread = threading.local()

    def call(self, *args_dev, **kwargs):
        argspec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        patch_scope = interp._patch_lang(self.fn)
        errors = []
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {name: arg if name in self.constexprs else interp._implicit_cvt(arg) for name, arg in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            builder.set_grid_dim(*grid)

            def program(x, y, z):
                try:
                    builder.set_grid_idx(x, y, z)
                    self.fn(**args)
                except BaseException as exc:  # re-raised in the launching thread
                    errors.append(exc)

            threads = [threading.Thread(target=program, args=idx, daemon=True) for idx in itertools.product(*map(range, grid))]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + timeout_s
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if any(thread.is_alive() for thread in threads):
                raise TimeoutError(f"programs still waiting after {timeout_s} s: a barrier never opened")
        finally:
            patch_scope.restore()
        if errors:
            raise errors[0]
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    switch_interval = sys.getswitchinterval()
    builder_type.grid_idx = property(
        lambda self: getattr(per_thread, "idx", None), lambda self, value: setattr(per_thread, "idx", value)
    )
    interp.GridExecutor.__call__ = call
    sys.setswitchinterval(1e-4)  # programs spinning at a barrier hand the interpreter over sooner
    try:
        yield
    finally:
        sys.setswitchinterval(switch_interval)
        interp.GridExecutor.__call__ = original_call
        del builder_type.grid_idx


@pytest.mark.skipif(DEVICE.type != "cpu", reason="on a GPU the programs run concurrently anyway")
@pytest.mark.parametrize("parts, tol", [(2, None), (3, 1e-5)])
def test_cooperative_parts_meet_at_barriers_in_threads(parts, tol, monkeypatch):
    """The cooperative kernel with each problem split over several programs, all running at once
    (threads under the interpreter), against the reference; without its barriers this fails."""
    monkeypatch.setattr(cooperative, "resident_programs", lambda device: 64)
    C, a, b = problem(2, 21, 17, torch.float32, seed=71, pad=True)
    C = C * torch.tensor([0.3, 2.0])[:, None, None]  # with tol: the problems stop at different checks
    with _interpreter_programs_in_threads():
        out = cooperative.solve_cooperative(C, a, b, 0.08, 15, tol, 5, True, parts=parts)
    assert_matches_reference(out, C, a, b, 0.08, 15, tol, 5)


def test_cooperative_parts_off_gpu():
    """Off a GPU each problem is one program: parts > 1 could never meet at their barrier."""
    C, a, b = problem(2, 30, 20, torch.float32, seed=67)
    if DEVICE.type == "cpu":
        assert cooperative.cooperative_parts(C) == 1
        with pytest.raises(ValueError, match="resident"):
            cooperative.solve_cooperative(C, a, b, 0.1, 5, None, 10, True, parts=2)
    else:
        parts = cooperative.cooperative_parts(C)
        assert 1 <= parts and 2 * parts <= torch.cuda.get_device_properties(DEVICE).multi_processor_count
        with pytest.raises(ValueError, match="resident"):
            cooperative.solve_cooperative(C, a, b, 0.1, 5, None, 10, True, parts=10_000)
