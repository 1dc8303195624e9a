"""aplot-kernels: fused kernels for optimal-transport reward-model losses (APLOT).

Public API (the contract: docs/contract.md):

* :func:`cosine_cost`, :func:`aplot_cost` (module :mod:`aplot_kernels.cost`)
* :func:`sinkhorn` -> :class:`SinkhornResult` (module :mod:`aplot_kernels.sinkhorn`, itself callable)
* :func:`aplot_margin` (package :mod:`aplot_kernels.margin`)
* :func:`bt_loss`, :func:`aplot_loss`, :class:`APLOTLoss` (module :mod:`aplot_kernels.loss`)
* :func:`set_value_checks`, :func:`value_checks`: switch the NaN/sign/mass checks (and their
  one host synchronisation per call) off or on
* trainer integration: :mod:`aplot_kernels.pooling`, :mod:`aplot_kernels.distributed`,
  :mod:`aplot_kernels.trl` (``APLOTRewardTrainer``, imports TRL)
"""

# The op modules, reachable as attributes (aplot_kernels.cost.cosine_cost, ...).
from . import backends, cost, distributed, loss, margin, pooling, sinkhorn  # noqa: F401
from ._checks import ArgumentTypeError, set_value_checks, value_checks
from .backends import BackendUnavailableError, available_backends
from .cost import aplot_cost, cosine_cost
from .loss import APLOTLoss, APLOTOutput, aplot_loss, bt_loss
from .margin import aplot_margin
from .sinkhorn import SinkhornResult

__version__ = "0.1.0"

__all__ = [
    "cosine_cost",
    "aplot_cost",
    "sinkhorn",
    "SinkhornResult",
    "bt_loss",
    "aplot_margin",
    "aplot_loss",
    "APLOTLoss",
    "APLOTOutput",
    "available_backends",
    "BackendUnavailableError",
    "ArgumentTypeError",
    "set_value_checks",
    "value_checks",
    "__version__",
]
