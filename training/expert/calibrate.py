"""Tail calibration: raw evidence -> "how many real-film standard deviations worse than usual".

The panel's networks are imperfect readers: a subtle granuloma on a real film may get a low
presence probability. A rater who failed every film the reader is unsure about would fail real
films. So each raw measurement is compared with its distribution on real, held-out (validation)
simulated films, in the direction that is bad for the criterion:

    z = (x - median) / scale      (upper tail: larger is worse, e.g. an unprompted finding's logit)
    z = (median - x) / scale      (lower tail: smaller is worse, e.g. a prompted finding's logit)

with ``scale = |q - median| / 1.645`` from the 5 % tail quantile ``q``, i.e. the standard deviation
a normal distribution with the same median and 95th (or 5th) percentile would have. A rater with
threshold 2.3 then fails about 1 % of real films on that criterion; a stricter one (2.0) about
2 %. The scale has a floor, so a measurement that never varies on real films does not turn every
small deviation into a huge z.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

Z95 = 1.6448536269514722  # standard normal 95th percentile
MIN_COUNT = 10  # fewer real values than this: fall back to the pooled statistics


@dataclasses.dataclass(frozen=True)
class Tail:
    """Median and tail scale of a measurement on real films, and which tail is bad."""

    median: float
    scale: float
    upper: bool  # True: large values are bad; False: small values are bad
    n: int = 0  # real films it was computed from

    def z(self, x):
        """Badness in real-film standard deviations (vectorised over numpy arrays and floats)."""
        d = (np.asarray(x, dtype=np.float64) - self.median) / self.scale
        return d if self.upper else -d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Tail":
        return cls(float(d["median"]), float(d["scale"]), bool(d["upper"]), int(d.get("n", 0)))


def fit_tail(values, upper: bool, min_scale: float) -> Tail:
    """The tail statistics of ``values`` (NaNs ignored); an empty input is an error."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("cannot calibrate on no values")
    med = float(np.median(v))
    q = float(np.percentile(v, 95 if upper else 5))
    return Tail(med, max(abs(q - med) / Z95, float(min_scale)), upper, int(v.size))


def fit_groups(values: Mapping[str, np.ndarray], upper: bool, min_scale: float,
               prior: Tail | None = None) -> dict[str, Tail]:
    """One tail per group, with the pooled tail (key "*") for groups of fewer than MIN_COUNT values.

    ``prior`` is the pooled tail when no group has a single value (a tiny validation split with,
    say, no sided finding); without a prior that is an error.
    """
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in values.values()]
    pooled = np.concatenate(arrays) if arrays else np.zeros(0)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0 and prior is None:
        raise ValueError("cannot calibrate on no values")
    out = {"*": fit_tail(pooled, upper, min_scale) if pooled.size else prior}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64).ravel()
        out[name] = fit_tail(v, upper, min_scale) if np.isfinite(v).sum() >= MIN_COUNT else out["*"]
    return out


LEVELS: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.975, 0.99, 0.995)  # quantile levels of a QuantileMap


def _probit(p):
    from scipy.special import ndtri

    return ndtri(np.asarray(p, dtype=np.float64))


@dataclasses.dataclass(frozen=True)
class QuantileMap:
    """A monotone map from a statistic to a normal score by its real-film quantiles.

    Between the stored quantiles ``x`` (at levels ``p``) the score is ``probit(ECDF(v))``, so
    P(score > t) on real films is 1 - Phi(t) whatever the statistic's shape: a heavy-tailed one (the
    worst of ten unprompted kinds, the worst anatomy feature) is not under-called by a normal fit.
    Outside the table the score continues linearly with the slope of its last (first) segment.
    """

    x: tuple[float, ...]  # quantiles of the statistic on real films (made strictly increasing)
    p: tuple[float, ...]  # their levels
    n: int = 0  # real films it was computed from

    def z(self, v):
        x, q = np.asarray(self.x), _probit(self.p)
        v = np.asarray(v, dtype=np.float64)
        lo = q[0] + (v - x[0]) * (q[1] - q[0]) / (x[1] - x[0])
        hi = q[-1] + (v - x[-1]) * (q[-1] - q[-2]) / (x[-1] - x[-2])
        mid = _probit(np.interp(v, x, self.p))
        return np.where(v < x[0], lo, np.where(v > x[-1], hi, mid))

    def to_dict(self) -> dict:
        return {"x": list(self.x), "p": list(self.p), "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantileMap":
        m = cls(tuple(float(v) for v in d["x"]), tuple(float(v) for v in d["p"]), int(d.get("n", 0)))
        if len(m.x) != len(m.p) or len(m.x) < 2 or any(b <= a for a, b in zip(m.x, m.x[1:])):
            raise ValueError(f"a quantile map needs >= 2 strictly increasing quantiles, got {d}")
        return m


def fit_quantiles(values, min_step: float, levels: tuple[float, ...] = LEVELS) -> QuantileMap:
    """The real-film quantiles of ``values`` at ``levels``; consecutive quantiles at least ``min_step`` apart
    (a statistic that is 0 on most real films still gets a usable, increasing table)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("cannot calibrate on no values")
    x = np.percentile(v, [100 * p for p in levels])
    for i in range(1, len(x)):
        x[i] = max(x[i], x[i - 1] + min_step)
    return QuantileMap(tuple(float(a) for a in x), tuple(levels), int(v.size))


def pick(tails: Mapping[str, Tail], name: str) -> Tail:
    """The tail of group ``name``, else the pooled one."""
    return tails.get(name) or tails["*"]
