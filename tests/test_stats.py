"""The paired non-inferiority rule (muonprof.stats) on synthetic paired losses."""

from __future__ import annotations

import math

import pytest

from muonprof.stats import first_reaching, geometric_mean, paired_comparison, t_quantile
from muonprof.train import EvalPoint


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [(0.95, 1, 6.313752), (0.95, 2, 2.919986), (0.95, 4, 2.131847), (0.975, 9, 2.262157), (0.95, 1e6, 1.644854)],
)
def test_t_quantile_matches_tables(p: float, df: float, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-6)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=2e-6)


def test_pass_clear_non_inferiority() -> None:
    ref = [2.50, 2.60, 2.55]
    cand = [r + d for r, d in zip(ref, (0.001, 0.002, 0.0015))]
    c = paired_comparison(cand, ref, margin=0.01)
    assert c.verdict == "non-inferior" and c.passes
    # the bound is mean + t(0.95, 2) sd / sqrt(3)
    assert c.upper_bound == pytest.approx(0.0015 + 2.919986 * 0.0005 / math.sqrt(3), rel=1e-5)


def test_better_when_the_whole_bound_is_below_zero() -> None:
    ref = [2.5, 2.6, 2.55, 2.7]
    c = paired_comparison([r - 0.05 + e for r, e in zip(ref, (0.001, -0.001, 0.002, 0.0))], ref, margin=0.01)
    assert c.verdict == "better" and c.passes


def test_fail_worse_beyond_the_margin() -> None:
    ref = [2.5, 2.6, 2.55]
    c = paired_comparison([r + 0.1 + e for r, e in zip(ref, (0.0, 0.005, -0.004))], ref, margin=0.01)
    assert c.verdict == "worse" and not c.passes
    assert c.lower_bound is not None and c.lower_bound > 0.01


def test_unpaired_means_would_mislead_paired_noise_decides() -> None:
    # mean difference small but the per-seed differences are noisy: not shown non-inferior
    ref = [2.5, 2.6, 2.55]
    c = paired_comparison([r + d for r, d in zip(ref, (-0.03, 0.04, 0.0))], ref, margin=0.01)
    assert c.verdict == "inconclusive" and not c.passes


def test_tie_identical_runs_pass() -> None:
    c = paired_comparison([2.5, 2.6, 2.55], [2.5, 2.6, 2.55], margin=0.01)
    assert c.mean_diff == 0 and c.std_diff == 0 and c.verdict == "non-inferior"
    # at margin 0 an exact tie is not "below" the margin
    assert paired_comparison([2.5, 2.6], [2.5, 2.6], margin=0.0).verdict == "inconclusive"


def test_one_seed_gives_numbers_but_no_verdict() -> None:
    c = paired_comparison([2.40], [2.50], margin=0.01)
    assert c.verdict == "one seed" and not c.passes
    assert c.mean_diff == pytest.approx(-0.1) and c.upper_bound is None
    assert "no verdict" in c.describe()


@pytest.mark.parametrize(
    ("cand", "ref", "margin"),
    [([1.0], [1.0, 2.0], 0.01), ([], [], 0.01), ([1.0], [1.0], -0.1), ([float("nan")], [1.0], 0.01)],
)
def test_bad_input_is_refused(cand: list[float], ref: list[float], margin: float) -> None:
    with pytest.raises(ValueError):
        paired_comparison(cand, ref, margin)


def test_first_reaching_and_geometric_mean() -> None:
    evals = [EvalPoint(0, 0.0, 5.0), EvalPoint(10, 1.0, 3.0), EvalPoint(20, 2.0, 2.4), EvalPoint(30, 3.0, 2.5)]
    assert first_reaching(evals, 2.45).step == 20
    assert first_reaching(evals, 2.0) is None
    assert first_reaching(evals, 9.0).step == 0
    assert geometric_mean([2.0, 0.5]) == pytest.approx(1.0)
    assert geometric_mean([]) is None


def test_check_margin_names_the_option_and_the_default_is_one_number() -> None:
    from muonprof.stats import DEFAULT_MARGIN, check_margin

    assert DEFAULT_MARGIN == 0.01 and check_margin(0) == 0.0 and check_margin("0.05") == 0.05
    for bad in (-1e-9, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="--max-loss-increase must be a finite number >= 0"):
            check_margin(bad, "--max-loss-increase")  # type: ignore[arg-type]
