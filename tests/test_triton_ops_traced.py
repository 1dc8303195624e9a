"""The Triton cost ops are ``torch.library.triton_op`` ops that AOTAutograd traces into their kernel launches.

Without a GPU: a subprocess without ``TRITON_INTERPRET`` (kernels defined
under the interpreter cannot be traced) compiles the cost ops forward and
backward with ``fullgraph=True`` on meta tensors, through AOTAutograd with a
backend that records the graphs (meta tensors launch nothing), and with the
sm_90 target standing in for the missing driver, so that torch's analysis of
which arguments a kernel writes runs as on a GPU. Checked: each graph holds
the kernel launches and no opaque cost op, each kernel writes only the
buffers the op allocated, the shapes and dtypes are the eager ones, the
source Inductor pastes for each kernel (its transitive closure) compiles to
Triton IR for sm_90, ``triton_op`` found every kernel an op launches (the
AOTAutograd cache keys on their source), ``torch.library.opcheck`` passes on
the traced ops, and with dynamic sizes a graph is reused within a size's
power-of-two bracket. Values under ``torch.compile`` on a GPU:
tests/test_compile_gpu.py; under the interpreter the ops are opaque
(tests/test_opcheck.py, tests/test_compile.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# The buffers each kernel writes: all of them allocated inside the op.
WRITES = {
    "_row_norms_kernel": ["x_out_ptr", "y_out_ptr"],
    "_cosine_cost_kernel": ["out_ptr"],
    "_aplot_cost_kernel": ["out_ptr"],
    "_grad_product_kernel": ["p_ptr"],  # and grad_rx_ptr with the rewards
    "_normalize_backward_kernel": ["p_ptr"],
}
FORWARD = {"cosine": ["_row_norms_kernel", "_cosine_cost_kernel"], "aplot": ["_row_norms_kernel", "_aplot_cost_kernel"]}
BACKWARD = ["_row_norms_kernel", *2 * ["_grad_product_kernel"], *2 * ["_normalize_backward_kernel"]]


def _trace_all() -> None:
    import importlib.util
    import tempfile

    import torch
    import triton
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import generate_ttir, kernel_side_table
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code
    from triton.backends.compiler import GPUTarget

    class Sm90:  # the part of a CUDA driver that torch's write analysis (generate_ttir) asks for
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    from aplot_kernels import _triton_ops as ops

    for op, kernels in (
        ("triton_cosine_cost", FORWARD["cosine"]),
        ("triton_aplot_cost", FORWARD["aplot"]),
        ("triton_cosine_cost_backward", BACKWARD),
        ("triton_aplot_cost_backward", BACKWARD),
    ):
        found = {k.__name__ for k in torch._library.triton.get_triton_kernels_for_op(f"aplot_kernels::{op}")}
        assert found == set(kernels), (op, found)

    def kernel_of(node):
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        while not isinstance(kernel, triton.JITFunction):  # num_warps/num_stages wrap it in an autotuner
            kernel = kernel.fn
        return kernel

    def closure_compiles(node, kernel, tmp):
        """Inductor's copy of the kernel (the kernel and every jit function and constant it reaches) to TTIR."""
        source = "import triton\nimport triton.language as tl\n\n@triton.jit\n"
        source += user_defined_triton_kernel_transitive_closure_source_code(kernel)
        path = os.path.join(tmp, f"{kernel.__name__}.py")
        with open(path, "w") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location(f"closure_{kernel.__name__}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        args = {**node.kwargs["kwargs"], **kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])}
        args = {k: torch.empty(2, dtype=v.meta["val"].dtype) if isinstance(v, torch.fx.Node) else v for k, v in args.items()}
        generate_ttir(getattr(module, kernel.__name__), args, {})

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    def launches(gm, tmp):
        names, ops_left = [], []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_of(node)
                writes = sorted(node.kwargs["tensors_to_clone"])
                want = sorted(WRITES[kernel.__name__] + (["grad_rx_ptr"] if "grad_rx_ptr" in writes else []))
                assert writes == want, (kernel.__name__, writes)
                closure_compiles(node, kernel, tmp)
                names.append(kernel.__name__)
            elif "aplot_kernels" in str(node.target):
                ops_left.append(str(node.target))
        assert not ops_left, ops_left
        return names

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    shape = dict(batch=2, n=5, m=7, d=9)  # not powers of two
    b, n, m, d = shape.values()
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            for name in ("cosine", "aplot"):
                graphs.clear()
                torch._dynamo.reset()
                x, y = torch.randn(b, n, d, device="meta", dtype=dtype), torch.randn(b, m, d, device="meta", dtype=dtype)
                rc, rr = torch.randn(b, n, device="meta", dtype=dtype), torch.randn(b, m, device="meta", dtype=dtype)
                inputs = [t.requires_grad_() for t in ((x, y) if name == "cosine" else (x, y, rc, rr))]

                def f(*args):
                    if name == "cosine":
                        return ops.cosine_cost(*args, 1e-8)
                    return ops.aplot_cost(*args, 0.7, 0.5, 1e-8, 1)

                cost = torch.compile(f, backend=backend, fullgraph=True)(*inputs)
                assert cost.shape == (b, n, m) and cost.dtype == torch.float32, (cost.shape, cost.dtype)
                grads = torch.autograd.grad(cost.sum(), inputs)
                for g, t in zip(grads, inputs):
                    assert g.shape == t.shape and g.dtype == t.dtype, (g.shape, g.dtype)
                assert len(graphs) == 2, len(graphs)
                assert launches(graphs[0], tmp) == FORWARD[name]
                assert launches(graphs[1], tmp) == BACKWARD
                print("traced", name, dtype)

    # opcheck drives the traced path too (fake tensors, AOTAutograd with dynamic shapes); on meta tensors
    # the op's body serves as both kernel and fake.
    for n, m, d in ((5, 7, 9), (4, 6, 8)):
        x, y = torch.randn(2, n, d, device="meta"), torch.randn(2, m, d, device="meta")
        rc, rr, g = torch.randn(2, n, device="meta"), torch.randn(2, m, device="meta"), torch.randn(2, n, m, device="meta")
        for requires_grad in (False, True):
            args = [t.detach().requires_grad_(requires_grad) for t in (x, y, rc, rr)]
            torch.library.opcheck(ops.cosine_cost, (*args[:2], 1e-8))
            torch.library.opcheck(ops.aplot_cost, (*args, 0.9, 0.7, 1e-8, 1))
        torch.library.opcheck(ops.cosine_cost_backward, (g, x, y, 1e-8))
        torch.library.opcheck(ops.aplot_cost_backward, (g, x, y, rc, rr, 0.9, 0.7, 1e-8, 0))
    print("opcheck")

    # Tiles depend on sizes only through their power-of-two brackets: a size in a traced bracket
    # reuses the graph (after the first recompile marks it dynamic), a new bracket recompiles.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda x, y: ops.cosine_cost(x, y, 1e-8).sum(), backend=counter, fullgraph=True)
    frames = []
    for n in (17, 20, 29, 37):
        f(torch.randn(2, n, 40, device="meta"), torch.randn(2, 23, 40, device="meta"))
        frames.append(counter.frame_count)
    assert frames == [1, 2, 2, 3], frames
    print("dynamic")


def test_cost_ops_trace_into_their_kernels():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--trace"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    done = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert done == 4 * ["traced"] + ["opcheck", "dynamic"], proc.stdout


if __name__ == "__main__" and sys.argv[1:2] == ["--trace"]:
    _trace_all()
