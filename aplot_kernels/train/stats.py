"""Summaries over seeds: mean and spread of a metric, and the paired difference of two methods.

The paired difference of method ``B`` minus method ``A`` over seeds
``s = 1..n`` (both trained with seed ``s``: same initial weights, same batch
order) is ``d_s = B_s - A_s``; its interval is Student's t-interval
``mean(d) +- t_{(1+level)/2, n-1} * sd(d) / sqrt(n)`` (``sd`` with ``n - 1``).
The t quantile comes from the closed form of Student's distribution for an
integer number of degrees of freedom (Abramowitz and Stegun 26.7.3-4),
inverted by bisection, so no statistics package is needed.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

__all__ = ["t_two_sided_mass", "t_quantile", "summarize", "paired_difference"]


def t_two_sided_mass(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's ``T`` with ``df`` (a positive int) degrees of freedom."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"`df` must be a positive int, got {df!r}")
    t = abs(float(t))
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        # 2/pi * (theta + sin(theta) * (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ... up to cos^(df-2)))
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2.0 / math.pi * (theta + s * total)
    # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(level: float, df: int) -> float:
    """The ``t`` with ``P(|T| <= t) = level``: the half-width factor of a two-sided ``level`` interval."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must lie in (0, 1), got {level}")
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, df) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_mass(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def _clean(values: Sequence[Optional[float]]):
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def summarize(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """``{"mean", "sd", "min", "max", "n"}`` over the values that are not None/NaN (``sd`` with ``n - 1``)."""
    xs = _clean(values)
    n = len(xs)
    if n == 0:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "min": min(xs), "max": max(xs), "n": n}


def paired_difference(
    baseline: Sequence[Optional[float]], other: Sequence[Optional[float]], level: float = 0.95
) -> Dict[str, Optional[float]]:
    """``other - baseline`` seed by seed: ``{"mean", "sd", "lo", "hi", "n"}`` with the t-interval ``[lo, hi]``.

    Seeds where either value is missing (None/NaN, e.g. a target never reached) are left out;
    ``n`` counts the seeds used. With fewer than two seeds there is no interval (``lo = hi = None``).
    """
    if len(baseline) != len(other):
        raise ValueError(f"`baseline` and `other` must have one value per seed, got {len(baseline)} and {len(other)}")
    diffs = [o - b for b, o in zip(baseline, other) if _clean([b]) and _clean([o])]
    out = summarize(diffs)
    out.pop("min"), out.pop("max")
    n = out["n"]
    if n >= 2:
        half = t_quantile(level, n - 1) * out["sd"] / math.sqrt(n)
        out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
    else:
        out["lo"] = out["hi"] = None
    out["level"] = level
    return out
