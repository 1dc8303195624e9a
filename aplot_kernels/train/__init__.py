"""``aplot-kernels train``: Bradley-Terry against APLOT on a real pretrained encoder, on the CPU.

* :mod:`.data`: the built-in preference data (deterministic, hard and easy
  pairs, an out-of-distribution split) and TRL-format files.
* :mod:`.model`: the packaged all-MiniLM-L6-v2 (or a local model), its frozen
  part run once, trainable top layers and a reward head.
* :mod:`.loop`: one training run per loss and seed, with accuracy curves.
* :mod:`.stats`: means, spreads and paired t-intervals over seeds.
* :mod:`.report`: the summary, the table, ``metrics.json`` and ``accuracy.png``.
* :mod:`.run`: the command line (``aplot-kernels train --help``).
"""

from .run import main

__all__ = ["main"]
