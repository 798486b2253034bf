"""The statistics of `gspo report` (report/stats.py) against values worked out by hand, closed
forms of the t distribution and published tables."""

import math

import pytest

from gspo_cli.report.stats import (clustered_paired_difference, holm_adjusted, mean_interval, normal_quantile,
                                   paired_difference, regularized_beta, t_quantile, t_two_sided_p, wilson_interval)


def t_two_sided_p_by_simpson(t: float, df: int, steps: int = 4000) -> float:
    """An independent reference: 1 − 2∫_0^|t| f(x) dx with Student's density f, Simpson's rule."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = abs(t) / steps
    area = f(0) + f(abs(t)) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 1 - 2 * area * h / 3


def test_normal_and_t_quantiles_match_the_tables_and_closed_forms():
    assert normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)  # df 1: Cauchy, 12.706
    # df 2: t_p = (2p − 1)/√(2p(1 − p)) = 0.95/√0.04875 = 4.30265
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)  # t tables: 2.776
    assert t_quantile(0.975, 29) == pytest.approx(2.045230, abs=1e-6)  # t tables: 2.045
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=1e-6)  # symmetric


def test_t_p_values_match_closed_forms_and_an_integral_of_the_density():
    assert t_two_sided_p(2.0, 1) == pytest.approx(1 - 2 / math.pi * math.atan(2.0), rel=1e-12)  # 0.29517
    assert t_two_sided_p(1.0, 2) == pytest.approx(1 - 1 / math.sqrt(3), rel=1e-12)  # 1 − |t|/√(2 + t²) = 0.42265
    assert t_two_sided_p(-1.0, 2) == t_two_sided_p(1.0, 2)
    for t, df in ((2.40832, 29), (1.0, 9), (3.5, 5)):
        assert t_two_sided_p(t, df) == pytest.approx(t_two_sided_p_by_simpson(t, df), abs=1e-9)
    assert regularized_beta(0.3, 1.0, 2.5) == pytest.approx(1 - 0.7 ** 2.5, rel=1e-12)  # I_x(1, b) = 1 − (1 − x)^b


def test_wilson_interval_of_8_of_10():
    # Newcombe (1998), method 3; by hand: z = 1.95996, center (0.8 + z²/20)/(1 + z²/10) = 0.71674,
    # half z/(1 + z²/10)·√(0.016 + z²/400) = 0.22658: (0.49016, 0.94332).
    got = wilson_interval(8, 10)
    assert (got.estimate, got.n) == (0.8, 10)
    assert (got.low, got.high) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    zero = wilson_interval(0, 10)  # not the Wald interval's point [0, 0]: z²/(n + z²) = 0.27753 above
    assert zero.low == pytest.approx(0.0, abs=1e-12) and zero.high == pytest.approx(3.8415 / 13.8415, abs=1e-4)


def test_mean_interval_is_students_t_with_n_minus_1_degrees_of_freedom():
    # [0.3, 0.4, 0.5]: mean 0.4, s = 0.1 (divisor n − 1 = 2), t_0.975(2) = 4.30265:
    # 0.4 ± 4.30265 · 0.1/√3 = 0.4 ± 0.24842. With z (1.96) it would be ± 0.11316; with s over n, ± 0.20284.
    got = mean_interval([0.3, 0.4, 0.5])
    assert got.estimate == pytest.approx(0.4) and got.n == 3
    assert (got.low, got.high) == pytest.approx((0.15158, 0.64842), abs=1e-5)
    one = mean_interval([0.43])  # one seed: no spread between seeds to speak of
    assert (one.estimate, one.low, one.high, one.n) == (0.43, None, None, 1)


def test_paired_difference_of_a_tiny_hand_made_case():
    # a = [1, 1, 0], b = [1, 0, 0]: d = [0, 1, 0], mean 1/3, s_d = √((1/9 + 4/9 + 1/9)/2) = 1/√3,
    # se = 1/3, t = 1, df = 2: p = 1 − 1/√3 = 0.42265; interval 1/3 ± 4.30265/3 = (−1.10088, 1.76755).
    # Unpaired (Welch: se = √(1/9 + 1/9) = 0.4714) the interval and p would be wider and larger.
    got = paired_difference([1, 1, 0], [1, 0, 0])
    assert got.diff == pytest.approx(1 / 3) and (got.n, got.a_only, got.b_only) == (3, 1, 0)
    assert got.p == pytest.approx(1 - 1 / math.sqrt(3), rel=1e-9)
    assert (got.low, got.high) == pytest.approx((-1.10088, 1.76755), abs=1e-5)


def test_paired_difference_over_30_pairs_by_hand():
    # 30 (seed, problem) pairs, 5 where only b is right: mean −1/6, Σ(d − m)² = 5·(5/6)² + 25·(1/6)²
    # = 150/36, s_d = √(150/36/29) = 0.379049, se = 0.069204, t = −2.40832, t_0.975(29) = 2.04523:
    # −0.166667 ± 0.141538 = (−0.30820, −0.02513); p from the t density's integral.
    got = paired_difference([0] * 5 + [1] * 10 + [0] * 15, [1] * 15 + [0] * 15)
    assert got.diff == pytest.approx(-1 / 6) and (got.n, got.a_only, got.b_only) == (30, 0, 5)
    assert (got.low, got.high) == pytest.approx((-0.30820, -0.02513), abs=1e-5)
    assert got.p == pytest.approx(t_two_sided_p_by_simpson(2.40832, 29), abs=1e-6)  # 0.022608


def test_paired_difference_without_spread_or_pairs():
    same = paired_difference([1, 0, 1], [1, 0, 1])
    assert (same.diff, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    all_better = paired_difference([1, 1], [0, 0])  # every pair +1: no doubt left by these pairs
    assert (all_better.diff, all_better.p) == (1.0, 0.0)
    single = paired_difference([1], [0])
    assert (single.diff, single.low, single.p, single.n) == (1.0, None, None, 1)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1, 0], [1])


def test_holm_adjustment_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm_adjusted([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjusted([0.2, 0.7]) == pytest.approx([0.4, 0.7])
    assert holm_adjusted([0.6, 0.5]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjusted([0.03]) == [0.03] and holm_adjusted([]) == []


def test_clustered_paired_difference_counts_a_cluster_once():
    # clusters p0 (2 pairs), p1 (2 pairs): cluster means +1 and −1/2, mean +1/4, s = 1.06066, se = 0.75,
    # t = 1/3 on 1 df: p = 1 − (2/π)·atan(1/3) = 0.79517; interval 0.25 ± 12.7062·0.75.
    d = clustered_paired_difference([1, 1, 1, 0], [0, 0, 1, 1], ["p0", "p0", "p1", "p1"])
    assert (d.diff, d.n, d.clusters, d.a_only, d.b_only) == (0.25, 4, 2, 2, 1)
    assert d.p == pytest.approx(1 - 2 / math.pi * math.atan(1 / 3), abs=1e-6)
    assert (d.low, d.high) == pytest.approx((0.25 - 12.706205 * 0.75, 0.25 + 12.706205 * 0.75), abs=1e-5)
    # one pair per cluster: the plain paired difference
    a, b = [1, 0, 1, 1, 0], [0, 0, 1, 0, 1]
    plain, each = paired_difference(a, b), clustered_paired_difference(a, b, range(5))
    assert (each.diff, each.low, each.high, each.p) == (plain.diff, plain.low, plain.high, plain.p)
