"""Static statistics of the on-chip Sinkhorn loops, compiled for a GPU without one.

``python -m bench.kernel_stats [--arch 90]`` compiles the fused Sinkhorn kernel
(both loops) and the fused margin kernel at the tile sizes ``"auto"`` launches,
specialised as a launch specialises them (16-byte aligned pointers and strides,
unit strides as constants), and prints for each: registers per thread, spill
bytes, and what one iteration of the Sinkhorn loop issues per thread (instructions,
``MUFU`` for ``exp2``/reciprocals, ``SHFL`` for intra-warp reductions, ``BAR``
for the cross-warp ones). Multiplied by the warps per scheduler, the
instruction count gives an issue bound per iteration (see ``FLOOR.md``); it
says nothing of latency, which only a GPU run measures. The margin kernel's
product loop is not counted (the Sinkhorn loop is the one with ``MUFU``).

The scaling-domain loop's body holds its log-domain fallback too (a branch that
is rarely taken), so its count is an upper bound on a hot iteration.

Needs the NVIDIA backend of Triton (its ``ptxas`` and ``nvdisasm``), no GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
COUNTED = ("MUFU", "SHFL", "BAR", "FADD", "FFMA", "FMUL", "FMNMX", "LDL", "STL")


def compile_for(fn, pointers, floats, constexprs, num_warps, arch, unit_strides=(), aligned_ints=(), num_stages=None):
    """``fn`` compiled for ``sm_{arch}`` as a launch with these arguments would compile it.

    ``pointers``: name -> element type (``"fp32"``, ``"bf16"``, ...); ``floats``: the float
    scalars (other scalars are int32); ``unit_strides``: ints a launch would see as 1 (then a
    constant); ``aligned_ints``: ints divisible by 16. Pointers are taken as 16-byte aligned only
    when ``unit_strides`` or ``aligned_ints`` are given (a launch-specialised build).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs, **{name: 1 for name in unit_strides})
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    specialised = (*pointers, *aligned_ints) if unit_strides or aligned_ints else ()
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in specialised}
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def main_loop(sass: str):
    """``(instructions, {opcode: count})`` of the Sinkhorn loop: of the loops (backward branches'
    bodies), the one with the most ``MUFU`` (``exp2``, reciprocals), then the longest."""
    label_at, instructions, pending = {}, [], []
    for raw in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", raw)
        if label:
            pending.append(label.group(1))
            continue
        instruction = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*)", raw)
        if instruction:
            label_at.update({name: len(instructions) for name in pending})
            pending = []
            instructions.append(instruction.group(1))
    loops = []
    for end, text in enumerate(instructions):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        start = label_at.get(target.group(1), end + 1) if target else end + 1
        if start <= end:
            counts = {}
            for body in instructions[start : end + 1]:
                opcode = re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", body)
                if opcode:
                    counts[opcode.group(1)] = counts.get(opcode.group(1), 0) + 1
            loops.append((end + 1 - start, counts))
    return max(loops, key=lambda loop: (loop[1].get("MUFU", 0), loop[0]), default=(0, {}))


def _stats(kernel, arch):
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    nvdisasm = os.path.join(os.path.dirname(ptxas), "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        Path(ptx).write_text(kernel.asm["ptx"])
        report = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a", ptx, "-o", cubin], capture_output=True, text=True).stderr
        Path(cubin).write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    length, counts = main_loop(sass)
    return dict(
        registers=int(registers.group(1)) if registers else None,
        spill_bytes=f"{spills.group(1)}/{spills.group(2)}" if spills else "?",
        loop=length,
        **{op: counts.get(op, 0) for op in COUNTED},
    )


def _cases():
    """``(name, kernel, pointers, floats, constexprs, unit strides, aligned ints, warps)`` as ``"auto"`` launches."""
    from aplot_kernels.margin import triton as loss_triton
    from aplot_kernels.triton_utils import num_warps_for
    from aplot_kernels.sinkhorn.triton import fused
    from aplot_kernels.sinkhorn.triton.experimental import fused_scaling

    f32 = "fp32"
    pointers = dict(
        c_ptr=f32,
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
    floats = ("eps", "tol", "neg_inv_hi", "neg_inv_lo")
    for block_n, block_m in ((128, 128), (64, 128), (64, 64), (32, 32)):
        warps = num_warps_for(block_n * block_m, per_thread=fused.FUSED_ENTRIES_PER_THREAD)
        for name, kernel in (("fused", fused.fused_kernel), ("fused-scaling", fused_scaling.fused_scaling_kernel)):
            yield (
                f"sinkhorn {name} {block_n}x{block_m}",
                kernel,
                pointers,
                floats,
                dict(HAS_TOL=False, WRITE_PLAN=True, BLOCK_N=block_n, BLOCK_M=block_m),
                ("stride_cm", "stride_an", "stride_bm", "stride_pm"),
                ("stride_cb", "stride_cn", "stride_ab", "stride_bb", "stride_pb", "stride_pn"),
                warps,
            )
    for emb, ieee, block_d in (("bf16", False, loss_triton.HALF_BLOCK_D), ("fp32", True, loss_triton.FP32_BLOCK_D)):
        warps = num_warps_for(128 * 128, per_thread=fused.FUSED_ENTRIES_PER_THREAD)
        yield (
            f"margin {emb} 128x128",
            loss_triton._aplot_margin_kernel,
            dict(x_ptr=emb, y_ptr=emb, rx_ptr=emb, ry_ptr=emb, out_ptr=f32),
            (
                "alpha",
                "inv_temperature",
                "sim_weight",
                "sim_offset",
                "norm_eps",
                "eps",
                "neg_inv_hi",
                "neg_inv_lo",
                "row_weight",
                "col_weight",
                "margin_scale",
            ),
            dict(IEEE_FP32=ieee, SCALING=False, BLOCK_N=128, BLOCK_M=128, BLOCK_D=block_d),
            ("stride_xd", "stride_yd", "stride_rx", "stride_ry"),
            ("stride_xn", "stride_ym", "D"),
            warps,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: H100)")
    parser.add_argument("--only", default="", help="only the kernels whose name starts with this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # interpreted kernels cannot be compiled
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "bench.kernel_stats", *(argv or sys.argv[1:])], env=env, cwd=_ROOT)
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    import triton

    print(f"sm_{args.arch}, triton {triton.__version__}; per thread; the loop columns count one iteration of the Sinkhorn loop")
    header = f"{'kernel':32s} {'warps':>5s} {'regs':>5s} {'spill_st/ld_B':>13s} {'loop':>6s} " + " ".join(
        f"{op:>6s}" for op in COUNTED
    )
    print(header)
    for name, fn, pointers, floats, constexprs, unit, aligned, warps in _cases():
        if not name.startswith(args.only):
            continue
        row = _stats(compile_for(fn, pointers, floats, constexprs, warps, args.arch, unit, aligned), args.arch)
        print(
            f"{name:32s} {warps:5d} {row['registers']!s:>5s} {row['spill_bytes']:>13s} {row['loop']:6d} "
            + " ".join(f"{row[op]:6d}" for op in COUNTED),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
