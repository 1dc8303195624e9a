"""Benchmarks of aplot-kernels against POT, GeomLoss, FlashSinkhorn and OTT-JAX.

``python -m bench`` runs the matrix (:mod:`bench.run`), ``python -m bench.table
results.csv`` prints the headline table (:mod:`bench.table`). See ``bench/README.md``.
"""
