"""Ahead-of-time compilation of every Triton kernel for the H100 (sm_90) and the A100 (sm_80), without a GPU.

Catches what the interpreter accepts but the compiler rejects, and kernels that
ask for more shared memory than the GPU has. Each capability compiles in a
subprocess (kernels defined under ``TRITON_INTERPRET=1`` cannot be compiled)
and takes minutes on a CPU: marked ``slow``, run by ``.ci/run`` as its own step.
"""

from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch


SHARED_MEMORY_PER_BLOCK = {90: 232448, 80: 166912}  # H100, A100: cudaDevAttrMaxSharedMemoryPerBlockOptin


def _compile_all(capability: int) -> None:
    from aplot_kernels.margin import triton as loss_mod
    from aplot_kernels.triton_utils import num_warps_for
    from aplot_kernels.cost import triton as cost_mod
    from aplot_kernels.sinkhorn.triton import fused, streamed, tiled
    from aplot_kernels.sinkhorn.triton.experimental import cooperative, fused_scaling, onepass
    from bench.kernel_stats import compile_for

    # Largest shared memory one program may ask for (opt-in, per block): a kernel over it compiles
    # here but fails at launch on the GPU with "out of resource: shared memory".
    shared_limit = SHARED_MEMORY_PER_BLOCK[capability]

    def build(fn, pointers, floats, constexprs, num_warps):
        kernel = compile_for(
            fn, pointers, floats, constexprs, num_warps, capability, num_stages=cost_mod.NUM_STAGES
        )  # as launched
        shared = kernel.metadata.shared
        print("compiled", fn.__name__, constexprs, f"shared memory {shared} B")
        assert shared <= shared_limit, (
            f"{fn.__name__} {constexprs}: {shared} B of shared memory, sm_{capability} has {shared_limit}"
        )

    f32 = "fp32"
    scaled = ("neg_inv_hi", "neg_inv_lo")
    for c_type in ("fp32", "bf16"):
        pointers = dict(
            c_ptr=c_type,
            a_ptr=f32,
            b_ptr=f32,
            plan_ptr=f32,
            row_cost_ptr=f32,
            f_ptr=f32,
            g_ptr=f32,
            cost_ptr=f32,
            reg_ptr=f32,
            iters_ptr="i64",
            err_ptr=f32,
        )
        for write_plan in (True, False):
            for kernel in (fused.fused_kernel, fused_scaling.fused_scaling_kernel):
                build(
                    kernel,
                    pointers,
                    ("eps", "tol") + scaled,
                    dict(HAS_TOL=c_type == "fp32", WRITE_PLAN=write_plan, BLOCK_N=64, BLOCK_M=128),
                    16,
                )
        # Other shapes auto sends to the fused kernel (one row, small and oblong), with their warps.
        for block_n, block_m in ((1, 16), (32, 64), (128, 8)):
            warps = num_warps_for(block_n * block_m, per_thread=fused.FUSED_ENTRIES_PER_THREAD)
            for kernel in (fused.fused_kernel, fused_scaling.fused_scaling_kernel):
                build(
                    kernel,
                    pointers,
                    ("eps", "tol") + scaled,
                    dict(HAS_TOL=True, WRITE_PLAN=True, BLOCK_N=block_n, BLOCK_M=block_m),
                    warps,
                )
        build(
            tiled.column_pass_kernel,
            dict(c_ptr=c_type, log_u_ptr=f32, b_ptr=f32, out_ptr=f32, active_ptr="i32"),
            scaled,
            dict(WRITE_V=True, BLOCK_N=128, BLOCK_M=32),
            8,
        )
        build(
            tiled.row_pass_kernel,
            dict(c_ptr=c_type, log_v_ptr=f32, a_ptr=f32, log_u_ptr=f32, active_ptr="i32"),
            scaled,
            dict(BLOCK_N=32, BLOCK_M=128),
            8,
        )
    for write_plan in (True, False):  # the solve, and the row transport costs alone
        build(
            streamed.streamed_kernel,
            dict(
                c_ptr="bf16",
                a_ptr=f32,
                b_ptr=f32,
                log_u_ptr=f32,
                log_v_ptr=f32,
                plan_ptr=f32,
                row_cost_ptr=f32,
                iters_ptr="i64",
                err_ptr=f32,
            ),
            ("tol",) + scaled,
            dict(HAS_TOL=True, WRITE_PLAN=write_plan, ROW_BLOCK_N=32, ROW_BLOCK_M=128, COL_BLOCK_N=128, COL_BLOCK_M=32),
            8,
        )
        build(
            tiled.plan_kernel,
            dict(c_ptr="fp16", log_u_ptr=f32, log_v_ptr=f32, plan_ptr=f32, row_cost_ptr=f32),
            scaled,
            dict(WRITE_PLAN=write_plan, BLOCK_N=32, BLOCK_M=128),
            8,
        )
    for has_tol in (True, False):
        build(
            cooperative.cooperative_kernel,
            dict(
                c_ptr="bf16",
                a_ptr=f32,
                b_ptr=f32,
                log_u_ptr=f32,
                log_v_ptr=f32,
                col_lse_ptr=f32,
                partial_err_ptr=f32,
                sync_ptr="i32",
                plan_ptr=f32,
                row_cost_ptr=f32,
                iters_ptr="i64",
                err_ptr=f32,
            ),
            ("tol",) + scaled,
            dict(HAS_TOL=has_tol, WRITE_PLAN=True, **{k.upper(): v for k, v in cooperative.COOPERATIVE_BLOCKS.items()}),
            4,
        )
    for rows, block_m in ((2, 4096), (64, 128)):
        build(
            onepass.row_pass_partials_kernel,
            dict(c_ptr="fp32", log_v_ptr=f32, a_ptr=f32, log_u_ptr=f32, partial_ptr=f32, active_ptr="i32"),
            scaled,
            dict(ROWS=rows, BLOCK_M=block_m),
            8,
        )
    build(
        onepass.column_sums_kernel,
        dict(partial_ptr=f32, col_sum_ptr=f32, b_ptr=f32, block_err_ptr=f32, block_small_ptr="i32", active_ptr="i32"),
        (),
        dict(BLOCK=onepass.ONEPASS_SUM_BLOCK),
        4,
    )
    build(
        onepass.apply_column_sums_kernel,
        dict(
            col_sum_ptr=f32,
            log_v_ptr=f32,
            b_ptr=f32,
            block_err_ptr=f32,
            block_small_ptr="i32",
            active_ptr="i32",
            exact_ptr="i32",
            err_ptr=f32,
            iters_ptr="i64",
        ),
        ("tol",),
        dict(BLOCK=onepass.ONEPASS_SUM_BLOCK, MAX_BLOCKS=16),
        4,
    )
    # The fused margin at its largest size and at smaller ones (with the warps they launch with):
    # wgmma for half inputs, exact FMA for float32.
    for emb_type, ieee, block_d in (("bf16", False, loss_mod.HALF_BLOCK_D), ("fp32", True, loss_mod.FP32_BLOCK_D)):
        for (block_n, block_m), scaling in itertools.product(((128, 128), (16, 16), (64, 32)), (False, True)):
            if (block_n, block_m) != (128, 128) and scaling:
                continue
            warps = num_warps_for(block_n * block_m, per_thread=fused.FUSED_ENTRIES_PER_THREAD)
            build(
                loss_mod._aplot_margin_kernel,
                dict(x_ptr=emb_type, y_ptr=emb_type, rx_ptr=emb_type, ry_ptr=f32, out_ptr=f32),
                (
                    "alpha",
                    "inv_temperature",
                    "sim_weight",
                    "sim_offset",
                    "norm_eps",
                    "eps",
                    "row_weight",
                    "col_weight",
                    "margin_scale",
                )
                + scaled,
                dict(IEEE_FP32=ieee, SCALING=scaling, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d),
                warps,
            )
    # k == 1 and flags of 0/1 may arrive as compile-time constants.
    build(
        tiled.check_kernel,
        dict(col_lse_ptr=f32, log_v_ptr=f32, b_ptr=f32, active_ptr="i32", err_ptr=f32, iters_ptr="i64"),
        ("tol",),
        dict(BLOCK=1024, k=1, apply_next_v=1),
        4,
    )
    for emb_type, ieee, tile in (
        ("fp32", True, cost_mod.FP32_TILE),
        ("bf16", False, cost_mod.HALF_TILES["small"]),
        ("bf16", False, cost_mod.HALF_TILES["large"]),
    ):
        block_n, block_m, block_d, warps = tile
        build(
            cost_mod._aplot_cost_kernel,
            dict(x_ptr=emb_type, y_ptr=emb_type, x_norm_ptr=f32, y_norm_ptr=f32, rx_ptr=emb_type, ry_ptr=f32, out_ptr=f32),
            ("alpha", "inv_temperature", "sim_weight", "sim_offset"),
            dict(IEEE_FP32=ieee, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d),
            warps,
        )
    build(
        cost_mod._cosine_cost_kernel,
        dict(x_ptr="fp16", y_ptr="fp16", x_norm_ptr=f32, y_norm_ptr=f32, out_ptr=f32),
        (),
        dict(IEEE_FP32=False, BLOCK_N=128, BLOCK_M=128, BLOCK_D=64),
        8,
    )
    build(
        cost_mod._row_norms_kernel,
        dict(x_ptr="bf16", y_ptr="bf16", x_out_ptr=f32, y_out_ptr=f32),
        ("eps",),
        dict(BLOCK_R=cost_mod.ROW_NORMS_BLOCK_R, BLOCK_D=256),
        4,
    )
    # Backward: the product with and without the reward reduction, and the row pass.
    block_n, block_m, block_d, warps = cost_mod.BACKWARD_TILE
    for emb_type, rewards in (("bf16", True), ("fp32", True), ("fp16", False)):
        build(
            cost_mod._grad_product_kernel,
            dict(g_ptr=f32, y_ptr=emb_type, y_norm_ptr=f32, rx_ptr=emb_type, ry_ptr=f32, p_ptr=f32, grad_rx_ptr=f32),
            ("reward_scale", "inv_temperature"),
            dict(REWARDS=rewards, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d),
            warps,
        )
    block_r, block_d, warps = cost_mod.JACOBIAN_TILE
    for emb_type in ("bf16", "fp32"):
        build(
            cost_mod._normalize_backward_kernel,
            dict(x_ptr=emb_type, x_norm_ptr=f32, p_ptr=f32),
            ("scale", "eps"),
            dict(BLOCK_R=block_r, BLOCK_D=block_d),
            warps,
        )


@pytest.mark.slow
@pytest.mark.parametrize("capability", [90, 80], ids=["sm90", "sm80"])
def test_kernels_compile_for_gpu(capability):
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("on a GPU every other test compiles and runs the kernels")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--compile-sm", str(capability)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__" and sys.argv[1:2] == ["--compile-sm"]:
    try:
        _compile_all(int(sys.argv[2]))
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" not in str(exc).lower():
            raise
        print(f"no ptxas for sm_{sys.argv[2]} compilation: {exc}")  # Triton installed without its CUDA tools
        raise SystemExit(3)
