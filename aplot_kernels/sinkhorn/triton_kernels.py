"""The former module path of :mod:`aplot_kernels.sinkhorn.triton`, kept for the importers not yet moved.

The Sinkhorn dispatch and the loss import the Triton Sinkhorn from here, and the
fused margin kernel takes its on-chip loops under their former private names.
Delete this module once they import :mod:`aplot_kernels.sinkhorn.triton` and its
``common``, ``fused`` and ``experimental.fused_scaling`` modules directly.
"""

from .triton import row_transport_costs, solve  # noqa: F401
from .triton.common import absorbed_kernel as _absorbed_kernel  # noqa: F401
from .triton.common import scaled_neg_cost as _scaled_neg_cost  # noqa: F401
from .triton.common import split_reciprocal as _split_reciprocal  # noqa: F401
from .triton.experimental.fused_scaling import scaling_iterations as _scaling_iterations  # noqa: F401
from .triton.fused import FUSED_ENTRIES_PER_THREAD, FUSED_MAX_ELEMENTS  # noqa: F401
from .triton.fused import fused_iterations as _fused_iterations  # noqa: F401


def use_scaling_domain() -> bool:
    """The scaling-domain margin loop is chosen by argument now, never by the environment."""
    return False
