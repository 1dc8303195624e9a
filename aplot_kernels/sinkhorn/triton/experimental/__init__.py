"""Experimental Triton Sinkhorn strategies: correct and tested, but never timed on a GPU.

Selected only by name, ``solve(..., strategy="fused-scaling" | "cooperative" | "onepass")``
(:mod:`aplot_kernels.sinkhorn.triton`); ``"auto"`` never picks them. Their tests
run under ``pytest -m experimental``; ``bench/gpu_check.py`` times them on a GPU.
Once timed, a strategy that wins somewhere moves up a level and into "auto";
one that loses everywhere is deleted (docs/design.md).
"""
