"""The GPU check's measured cases: a Sinkhorn shape over every strategy and library, and the APLOT margin.

Methods of :class:`bench.gpu_check.Runner` (which times, records and summarises); kept here so that
each file stays readable in one sitting.
"""

from __future__ import annotations


def _summary(values) -> str:
    values = values.tolist()
    return f"min {min(values)} max {max(values)}" if len(set(values)) > 1 else str(values[0])


class CaseBuilders:
    """``sinkhorn_case`` and ``margin_case``: each builds its inputs and float64 reference, then ``self.add``s every
    implementation (``self.skip`` where one cannot run)."""

    def sinkhorn_case(self, case, *, batch, n, m, n_iters, strategies, pot_loop=True, repeats=None, eps=0.1):
        torch = self.torch
        from aplot_kernels.sinkhorn import reference
        from aplot_kernels.sinkhorn import triton as triton_sinkhorn

        gen = torch.Generator(device=self.device).manual_seed(0)
        C = torch.rand(batch, n, m, device=self.device, generator=gen) * 2
        a = torch.full((batch, n), 1.0 / n, device=self.device)
        b = torch.full((batch, m), 1.0 / m, device=self.device)
        shape, dtype = f"B={batch} N={n} M={m}", torch.float32
        with torch.no_grad():
            ref64 = reference.solve(C.double(), a.double(), b.double(), eps, n_iters, None, 10).plan
        for strategy in strategies:

            def run(s=strategy):
                return triton_sinkhorn.solve(C, a, b, eps, n_iters, None, 10, strategy=s)

            self.add(
                case,
                f"triton-{strategy}",
                shape,
                dtype,
                n_iters,
                run,
                reference_plan=ref64,
                plan_of=lambda r=run: r().plan,
                repeats=repeats,
            )
        # The public entry point: the same kernels plus argument checks (one host synchronisation).
        import aplot_kernels

        self.add(
            case,
            "sinkhorn(backend='triton')",
            shape,
            dtype,
            n_iters,
            lambda: aplot_kernels.sinkhorn(C, eps=eps, n_iters=n_iters, grad="none", backend="triton"),
            repeats=repeats,
            note="public API: checks included",
        )
        if self.native_ok:
            from aplot_kernels.sinkhorn import native

            def run_native():
                return native.solve(C, a, b, eps, n_iters, None, 10)

            self.add(
                case,
                "native (CUDA)",
                shape,
                dtype,
                n_iters,
                run_native,
                reference_plan=ref64,
                plan_of=lambda: run_native().plan,
                repeats=repeats,
            )
        else:
            self.skip(case, "native (CUDA)", shape, dtype, n_iters, self.native_why)

        # Tolerance mode: device-side stop flags, no host sync in the loop (tol reached well before the cap).
        def tol_run():
            return triton_sinkhorn.solve(C, a, b, eps, n_iters, 1e-6, 10)

        try:
            tol_note = "n_iters per problem: " + _summary(tol_run().n_iters)
        except Exception as exc:  # recorded by add() as a failed row
            tol_note = f"({type(exc).__name__})"
        self.add(case, "triton-auto tol=1e-6 every 10", shape, dtype, n_iters, tol_run, repeats=repeats, note=tol_note)
        self.add(
            case,
            "torch reference (fp32)",
            shape,
            dtype,
            n_iters,
            lambda: reference.solve(C, a, b, eps, n_iters, None, 10),
            reference_plan=ref64,
            plan_of=lambda: reference.solve(C, a, b, eps, n_iters, None, 10).plan,
            repeats=repeats,
        )
        if self.ot is None:
            self.skip(case, "POT", shape, dtype, n_iters, self.pot_note)
            return
        ot = self.ot

        def batch_solve():
            return ot.batch.solve_batch(C, eps, a=a, b=b, max_iter=n_iters, tol=0.0, method="log_sinkhorn")

        self.add(
            case,
            "POT solve_batch log_sinkhorn",
            shape,
            dtype,
            n_iters,
            batch_solve,
            repeats=repeats,
            note="row update first: same iteration count, not the same iterates",
        )
        if pot_loop:

            def loop():
                return [
                    ot.sinkhorn(a[i], b[i], C[i], eps, method="sinkhorn_log", numItermax=n_iters, stopThr=0.0)
                    for i in range(batch)
                ]

            self.add(
                case,
                "POT sinkhorn_log (loop)",
                shape,
                dtype,
                n_iters,
                loop,
                reference_plan=ref64,
                plan_of=lambda: torch.stack(loop()),
                repeats=min(repeats or self.repeats, 3),
                note=f"one ot.sinkhorn call per problem ({batch} calls)",
            )

    def margin_case(self, *, n, d, n_iters, eps=0.1):
        torch = self.torch
        from aplot_kernels import aplot_cost, aplot_margin, value_checks

        gen = torch.Generator(device=self.device).manual_seed(1)
        dtype = torch.bfloat16
        emb_c = torch.randn(n, d, device=self.device, generator=gen).to(dtype)
        emb_r = torch.randn(n, d, device=self.device, generator=gen).to(dtype)
        r_c = torch.randn(n, device=self.device, generator=gen).to(dtype)
        r_r = torch.randn(n, device=self.device, generator=gen).to(dtype)
        shape, case = f"n={n} D={d}", "aplot_margin"
        kwargs = dict(eps=eps, n_iters=n_iters, detach=True)
        want = aplot_margin(r_c.double(), r_r.double(), emb_c.double(), emb_r.double(), backend="torch", **kwargs)
        for backend in ("triton", "native", "torch"):
            if backend == "native" and not self.native_ok:
                self.skip(case, "native aplot_margin", shape, dtype, n_iters, self.native_why)
                continue

            def run(be=backend):
                return aplot_margin(r_c, r_r, emb_c, emb_r, backend=be, **kwargs)

            try:
                note = f"margin rel err vs float64 torch {((run().double() - want).abs().max() / want.abs().max()).item():.2e}"
            except Exception as exc:  # recorded by add() as a failed row
                note = f"no error measured ({type(exc).__name__})"
            self.add(case, f"{backend} aplot_margin", shape, dtype, n_iters, run, note=note)
        from aplot_kernels.margin import triton as loss_triton
        from aplot_kernels.cost import triton as cost_kernels
        from aplot_kernels.sinkhorn import triton as sinkhorn_kernels

        if self.cooperative_ok and not loss_triton.fits(n, n):
            uniform = torch.full((1, n), 1.0 / n, device=self.device)

            def cooperative():
                cost = cost_kernels.aplot_cost(emb_c[None], emb_r[None], r_c[None], r_r[None], 0.9, 1.0, 1e-8)
                return n * sinkhorn_kernels.row_transport_costs(cost, uniform, uniform, eps, n_iters, strategy="cooperative")[0]

            note = (
                f"margin rel err vs float64 torch {((cooperative().double() - want).abs().max() / want.abs().max()).item():.2e}"
            )
            self.add(case, "triton cost + cooperative row-cost solve", shape, dtype, n_iters, cooperative, note=note)
        if loss_triton.fits(n, n):
            # What the fused margin kernel replaces: the cost kernel, then the row-cost Sinkhorn.
            uniform = torch.full((1, n), 1.0 / n, device=self.device)

            def unfused():
                cost = cost_kernels.aplot_cost(emb_c[None], emb_r[None], r_c[None], r_r[None], 0.9, 1.0, 1e-8)
                return n * sinkhorn_kernels.row_transport_costs(cost, uniform, uniform, eps, n_iters)[0]

            note = f"margin rel err vs float64 torch {((unfused().double() - want).abs().max() / want.abs().max()).item():.2e}"
            self.add(case, "triton cost + row-cost solve (unfused)", shape, dtype, n_iters, unfused, note=note)

            def fused_scaling():
                return loss_triton.aplot_margin(r_c, r_r, emb_c, emb_r, 0.9, 1.0, 1e-8, eps, n_iters, 1.0, scaling=True)

            note = (
                f"margin rel err vs float64 torch {((fused_scaling().double() - want).abs().max() / want.abs().max()).item():.2e}"
            )
            self.add(case, "triton fused margin, scaling domain", shape, dtype, n_iters, fused_scaling, note=note)

            # The same kernel without the public call's work (argument checks, their read-back, dispatch),
            # and the public call with the value checks (and their host synchronisation) off: the
            # differences are the host work per call.
            def fused_kernel():
                return loss_triton.aplot_margin(r_c, r_r, emb_c, emb_r, 0.9, 1.0, 1e-8, eps, n_iters, 1.0, scaling=False)

            self.add(case, "triton fused margin kernel (direct)", shape, dtype, n_iters, fused_kernel)

            def unchecked():
                with value_checks(False):
                    return aplot_margin(r_c, r_r, emb_c, emb_r, backend="triton", **kwargs)

            self.add(case, "triton aplot_margin, value checks off", shape, dtype, n_iters, unchecked)
        cost_want = aplot_cost(emb_c.double(), emb_r.double(), r_c.double(), r_r.double(), backend="torch")
        for backend in ("triton", "native", "torch"):
            if backend == "native" and not self.native_ok:
                continue

            def run(be=backend):
                return aplot_cost(emb_c, emb_r, r_c, r_r, backend=be)

            try:
                note = f"cost max abs err vs float64 torch {(run().double() - cost_want).abs().max().item():.2e}"
            except Exception as exc:  # recorded by add() as a failed row
                note = f"no error measured ({type(exc).__name__})"
            self.add(case, f"{backend} aplot_cost only", shape, dtype, 0, run, note=note)
        if self.ot is None:
            self.skip(case, "POT", shape, dtype, n_iters, self.pot_note)
            return
        ot = self.ot

        def pot_margin():
            cost = aplot_cost(emb_c, emb_r, r_c, r_r, backend="torch")
            uniform = torch.full((n,), 1.0 / n, device=self.device)
            plan = ot.sinkhorn(uniform, uniform, cost, eps, method="sinkhorn_log", numItermax=n_iters, stopThr=0.0)
            return n * (plan * cost).sum(-1)

        self.add(case, "POT sinkhorn_log + torch cost", shape, dtype, n_iters, pot_margin)
