"""The statistics a report states: intervals on accuracies and paired comparisons of runs.

Pure functions of plain numbers (no scipy: the t distribution comes from the regularized
incomplete beta function, evaluated by its continued fraction, and inverted by bisection).
Every interval is two-sided at `confidence` (default 95%).

- `wilson_interval`: one run's held-out accuracy, k correct of n problems (Wilson score
  interval: unlike the Wald interval p ± z·√(p(1−p)/n) it stays inside [0, 1] and does not
  shrink to a point at 0 or n correct).
- `mean_interval`: a mean over seeds, Student's t with n − 1 degrees of freedom (no interval
  at n = 1: one seed says nothing about the spread between seeds).
- `paired_difference`: two runs (or two evaluations of one run) on the same problems, paired
  per problem: the paired t interval and two-sided p-value of the mean per-pair difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval; `low`/`high` are None when there is none (n = 1)."""

    estimate: float
    low: Optional[float]
    high: Optional[float]
    n: int


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a − b over pairs, its paired t interval and two-sided p-value."""

    diff: float
    low: Optional[float]
    high: Optional[float]
    p: Optional[float]
    n: int
    """Pairs (e.g. seeds × problems)."""
    a_only: int
    """Pairs where a > b (for 0/1 outcomes: a right, b wrong)."""
    b_only: int
    """Pairs where b > a."""
    clusters: Optional[int] = None
    """With `clustered_paired_difference`: the clusters (e.g. problems) the interval and p count."""


# ---------------------------------------------------------------------------- distributions


def normal_quantile(p: float) -> float:
    """Φ⁻¹(p) of the standard normal, by bisection on Φ(x) = (1 + erf(x/√2)) / 2.

    Reference: Φ⁻¹(0.975) = 1.959964 (any normal table).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    return _bisect(cdf, p, -40.0, 40.0)


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 ≤ x ≤ 1 and a, b > 0.

    The continued fraction of Numerical Recipes (§6.4, `betai`/`betacf`, modified Lentz),
    used directly where it converges fast (x < (a + 1)/(a + b + 2)) and through
    I_x(a, b) = 1 − I_{1−x}(b, a) elsewhere. Reference: I_x(1, b) = 1 − (1 − x)^b.
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"I_x(a, b) needs 0 <= x <= 1, got x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float, eps: float = 1e-15, max_terms: int = 10_000) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"the continued fraction of I_x(a, b) did not converge (x={x}, a={a}, b={b})")


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t²)}(df/2, 1/2).

    Reference: for df = 2 it is 1 − |t|/√(2 + t²); for df = 1, 1 − (2/π)·atan|t|.
    """
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / (df + t * t), df / 2.0, 0.5)


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom, by bisection on its CDF.

    References (any t table): t_{0.975}(1) = 12.706, t_{0.975}(2) = 4.303, t_{0.975}(4) = 2.776.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    cdf = lambda t: 1.0 - 0.5 * t_two_sided_p(t, df) if t >= 0 else 0.5 * t_two_sided_p(t, df)  # noqa: E731
    high = 1.0
    while cdf(high) < p:
        high *= 2.0
    low = -1.0
    while cdf(low) > p:
        low *= 2.0
    return _bisect(cdf, p, low, high)


def _bisect(increasing, target: float, low: float, high: float, iterations: int = 200) -> float:
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        if increasing(mid) < target:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


# ---------------------------------------------------------------------------- intervals


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval of a proportion: k = `successes` of n (e.g. problems answered right).

    (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n), with z the normal quantile of
    (1 + confidence)/2. Reference: 8 of 10 at 95% gives (0.4902, 0.9433) (Newcombe 1998,
    "Two-sided confidence intervals for the single proportion", method 3).
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"a proportion needs 0 <= successes <= n and n > 0, got {successes} of {n}")
    z = normal_quantile(0.5 + confidence / 2.0)
    p = successes / n
    scale = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, center - half), min(1.0, center + half), n)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of `values` (e.g. one final accuracy per seed) with Student's t interval.

    mean ± t_{(1+confidence)/2}(n − 1) · s/√n, s the sample standard deviation (divisor n − 1).
    With one value there is no interval (low = high = None): the spread between seeds is unknown.
    Reference: [0.3, 0.4, 0.5] gives 0.4 ± 4.303·0.1/√3 = (0.152, 0.648).
    """
    n = len(values)
    if n == 0:
        raise ValueError("a mean needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, None, None, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """a − b paired element by element (e.g. per (seed, problem): 1 if answered right, else 0).

    The paired t test on the per-pair differences d: mean d ± t(n − 1)·s_d/√n, and the
    two-sided p-value of t = mean d / (s_d/√n). For 0/1 outcomes on hundreds of problems this
    is the normal approximation of McNemar's test on the discordant pairs (`a_only`,
    `b_only`), with an interval on the difference of accuracies that McNemar's test lacks.
    When every difference is the same, s_d = 0: the interval is that value and p is 1 if it
    is 0, else 0. Fewer than 2 pairs: no interval and no p-value.
    Reference: a = [1, 1, 0], b = [1, 0, 0]: d = [0, 1, 0], mean 1/3, s_d = 1/√3, t = 1,
    df = 2: p = 1 − 1/√3 = 0.4226, interval 1/3 ± 4.303/3 = (−1.101, 1.768).
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("a paired difference needs at least one pair")
    d = [x - y for x, y in zip(a, b)]
    a_only, b_only = sum(v > 0 for v in d), sum(v < 0 for v in d)
    mean = sum(d) / n
    if n == 1:
        return PairedDifference(mean, None, None, None, 1, a_only, b_only)
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    if sd == 0.0:
        return PairedDifference(mean, mean, mean, 1.0 if mean == 0 else 0.0, n, a_only, b_only)
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * se
    return PairedDifference(mean, mean - half, mean + half, t_two_sided_p(mean / se, n - 1), n, a_only, b_only)


def clustered_paired_difference(a: Sequence[float], b: Sequence[float], clusters: Sequence[Hashable],
                                confidence: float = CONFIDENCE) -> PairedDifference:
    """a − b paired element by element, with pairs that share a cluster counted as one: the
    interval and p-value are `paired_difference`'s on the clusters' mean differences (t with
    clusters − 1 degrees of freedom), the discordant counts and `n` over all pairs.

    For (seed, problem) pairs the cluster is the problem: a problem one algorithm answers and the
    other does not tends to stay so on every seed, so its seeds' pairs are not independent, and a
    t over all seeds × problems pairs would read 3 seeds of one problem as 3 problems' evidence.
    Reference: clusters [p0, p0, p1, p1], a = [1, 1, 1, 0], b = [0, 0, 1, 1]: cluster means
    +1 and −1/2, mean +1/4, s = 1.06066, t = 1/3 on 1 df: p = 0.79517.
    """
    if not (len(a) == len(b) == len(clusters)):
        raise ValueError(f"clustered pairs need equal lengths, got {len(a)}, {len(b)} and {len(clusters)}")
    by_cluster: dict[Hashable, list[float]] = {}
    for x, y, c in zip(a, b, clusters):
        by_cluster.setdefault(c, []).append(x - y)
    means = [sum(d) / len(d) for d in by_cluster.values()]
    pooled, each = paired_difference(a, b, confidence), paired_difference(means, [0.0] * len(means), confidence)
    return PairedDifference(each.diff, each.low, each.high, each.p, pooled.n, pooled.a_only, pooled.b_only,
                            clusters=len(means))


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values (Holm 1979), in the order given: sorted
    p_(1) ≤ … ≤ p_(m), the i-th smallest becomes max over j ≤ i of min(1, (m − j + 1)·p_(j)).
    Reading the adjusted values against 0.05 keeps the chance of any false "significant" among
    all m comparisons at 5%; read one by one, m comparisons give about 0.05·m by chance alone
    (18 against one baseline: about one). Valid whatever the comparisons' dependence.
    Reference: [0.01, 0.04, 0.03, 0.005] → [0.03, 0.06, 0.06, 0.02].
    """
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
