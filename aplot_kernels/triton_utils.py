"""Small helpers shared by the Triton kernel modules (launch sizes, constants)."""

from __future__ import annotations

import triton.language as tl

LOG2E = 1.4426950408889634  # 1 / ln 2: exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453  # log(x) = log2(x) * LN2

# The same constants for use inside kernels (jit functions may read constexpr globals only).
LOG2E_K = tl.constexpr(LOG2E)
LN2_K = tl.constexpr(LN2)

# tl.dot needs every block dimension >= 16.
MIN_DOT_BLOCK = 16


# Host-side launch arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr
# functions whose calls from Python cost microseconds each, and a launch makes several.


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def block_size(extent: int, *, lo: int = 1, hi: int) -> int:
    """The next power of two >= ``extent``, clamped to ``[lo, hi]`` (powers of two)."""
    if isinstance(extent, int):
        return max(lo, min(hi, 1 << (max(extent, 1) - 1).bit_length()))
    # A size traced by torch.compile (SymInt): comparisons guard the graph on the size's power-of-two
    # bracket, where reading its value would specialise the graph to that one size.
    block = lo
    while block < hi and block < extent:
        block *= 2
    return block


def num_warps_for(elements: int, *, per_thread: int = 64) -> int:
    """Warps (4 to 16) for a program holding ``elements`` fp32 values, about ``per_thread`` per thread."""
    return block_size(cdiv(int(elements), per_thread * 32), lo=4, hi=16)
