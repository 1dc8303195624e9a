"""The ``aplot-kernels`` command.

* ``aplot-kernels train ...``: BT against APLOT on a pretrained encoder, paired by seed (:mod:`aplot_kernels.train`).
* ``aplot-kernels bench ...``: the kernel benchmarks of the top-level ``bench`` package (source checkouts).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional

__all__ = ["main"]

USAGE = """usage: aplot-kernels {train,bench} [options]

commands:
  train   train a reward model with the Bradley-Terry and the APLOT loss on several seeds and compare them
  bench   run the kernel benchmarks (from a source checkout)

`aplot-kernels <command> --help` describes a command's options."""


def _bench_main():
    """``main`` of the top-level ``bench`` package, looked up in the source checkout this package sits in."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(checkout, "bench")) and checkout not in sys.path:
        sys.path.insert(0, checkout)
    errors = []
    for module_name in ("bench.__main__", "bench.run"):
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            errors.append(f"{module_name}: {err}")
            continue
        if callable(getattr(module, "main", None)):
            return module.main
        errors.append(f"{module_name}: no main()")
    raise ImportError("; ".join(errors))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        try:
            from .train.run import main as train_main
        except ImportError as err:
            print(f"aplot-kernels train needs the train extra: pip install 'aplot-kernels[train]' ({err})", file=sys.stderr)
            return 1
        return train_main(rest)
    if command == "bench":
        try:
            bench_main = _bench_main()
        except ImportError as err:
            print(
                "aplot-kernels bench runs the benchmarks of the `bench` package, which ships with the source "
                f"checkout, not with the installed package: run it from a checkout (python -m bench). ({err})",
                file=sys.stderr,
            )
            return 1
        result = bench_main(rest)
        return int(result or 0)
    print(f"aplot-kernels: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
