"""``python -m aplot_kernels.train`` is ``aplot-kernels train``."""

import sys

from .run import main

sys.exit(main())
