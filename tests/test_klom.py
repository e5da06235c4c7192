"""KLoM (matching/klom.py): hand-computed cases, an independent per-point implementation, summaries."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import entropy

from matching.errors import MatchingError
from matching.klom import klom, klom_summary, spread_ratio


def reference_klom(p_samples, q_samples, bins=20, clip=100.0, eps=1e-5):
    """KL(p‖q) of one point, written independently: np.histogram over the combined range, scipy.stats.entropy."""
    p_samples, q_samples = np.clip(p_samples, -clip, clip), np.clip(q_samples, -clip, clip)
    both = np.concatenate([p_samples, q_samples])
    span = (both.min(), both.max())
    p = np.histogram(p_samples, bins=bins, range=span)[0] / len(p_samples)
    q = np.histogram(q_samples, bins=bins, range=span)[0] / len(q_samples)
    return entropy(p, np.where(p > 0, np.maximum(q, eps), q))


# Three points, 4 models each (one column per point):
#  0: oracle {0, 0, 1, 2}, unlearned {0, 2, 2, 2}: range 0..2, 20 bins of 0.1, so 0 → bin 0, 1 → bin 10,
#     2 (the maximum) → bin 19. p = (.5, .25, .25) on bins (0, 10, 19); q = (.25, 0, .75), floored to
#     (.25, 1e-5, .75) and renormalised by Z = 1.00001.
#  1: oracle {150, 150, 300, 300}, unlearned {150} × 4: clipping to ±100 makes every value 100 → KLoM 0
#     (unclipped it would be .5·log(.5Z/1) + .5·log(.5Z/1e-5) > 0).
#  2: every value 7 → one bin for both → 0.
ORACLE = np.array([[0, 150, 7], [0, 150, 7], [1, 300, 7], [2, 300, 7]], dtype=np.float32)
UNLEARNED = np.array([[0, 150, 7], [2, 150, 7], [2, 150, 7], [2, 150, 7]], dtype=np.float32)
Z = 1 + 1e-5
HAND_0 = 0.5 * math.log(0.5 / (0.25 / Z)) + 0.25 * math.log(0.25 / (1e-5 / Z)) + 0.25 * math.log(0.25 / (0.75 / Z))


def test_klom_matches_the_hand_computed_case():
    assert HAND_0 == pytest.approx(2.6035883, abs=1e-6)  # log Z + ½ log 2 + ¼ log 25000 − ¼ log 3
    np.testing.assert_allclose(klom(ORACLE, UNLEARNED), [HAND_0, 0.0, 0.0], rtol=1e-12, atol=1e-15)


def test_the_other_direction_swaps_p_and_q():
    # p = unlearned (.25, .75) on bins (0, 19), q = oracle (.5, .25, .25): no floor needed.
    hand = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.25)
    assert hand == pytest.approx(0.6506721, abs=1e-6)
    got = klom(ORACLE, UNLEARNED, direction="unlearned||oracle")
    np.testing.assert_allclose(got, [hand, 0.0, 0.0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got, klom(UNLEARNED, ORACLE), rtol=1e-12, atol=1e-15)


def test_clipping_is_what_makes_point_1_zero():
    unclipped = 0.5 * math.log(0.5 * Z) + 0.5 * math.log(0.5 / (1e-5 / Z))
    assert klom(ORACLE[:, 1:2], UNLEARNED[:, 1:2], clip=1000.0)[0] == pytest.approx(unclipped, rel=1e-12)


def test_klom_matches_an_independent_per_point_implementation():
    rng = np.random.default_rng(0)
    n_a, n_b, points = 30, 25, 400
    oracle = rng.normal(0, 3, (n_a, points))
    unlearned = rng.normal(1, 2, (n_b, points))
    ties = slice(0, 100)  # small integers: many values on bin edges, repeated values, shared extremes
    oracle[:, ties] = rng.integers(-3, 4, (n_a, 100))
    unlearned[:, ties] = rng.integers(-3, 4, (n_b, 100))
    oracle[:, 100:120] *= 80  # beyond ±100 for some models: clipped
    oracle[:, 120:130] = unlearned[:, 120:130] = 5.5  # degenerate points
    unlearned[:, 130:140] = oracle[:1, 130:140]  # one sample constant, the other not
    for direction, (p, q) in {"oracle||unlearned": (oracle, unlearned), "unlearned||oracle": (unlearned, oracle)}.items():
        expected = np.array([reference_klom(p[:, j], q[:, j]) for j in range(points)])
        got = klom(oracle, unlearned, direction=direction)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert (got[120:130] == 0).all() and (got[:120] > 0).mean() > 0.9


def test_a_sample_against_itself_is_zero_and_more_bins_see_more():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 30))
    np.testing.assert_allclose(klom(a, a), 0.0, atol=1e-12)  # q renormalised: rounding only
    b = a + 0.3
    assert (klom(a, b, bins=1) == 0).all() and (klom(a, b, bins=20) > 1e-3).all()


@pytest.mark.parametrize("oracle, unlearned, kwargs, message", [
    (np.zeros((4, 3)), np.zeros((4, 2)), {}, "3 points but unlearned margins 2"),
    (np.zeros(4), np.zeros((4, 1)), {}, "(models, points) array"),
    (np.zeros((0, 3)), np.zeros((4, 3)), {}, "at least one model"),
    (np.full((4, 3), np.nan), np.zeros((4, 3)), {}, "NaN at 3 point(s)"),
    (np.zeros((4, 3)), np.zeros((4, 3)), {"direction": "p||q"}, "unknown KLoM direction"),
    (np.zeros((4, 3)), np.zeros((4, 3)), {"bins": 0}, "bins >= 1"),
    (np.zeros((4, 3)), np.zeros((4, 3)), {"eps": 0.0}, "0 < eps < 1"),
])
def test_bad_input_is_a_one_line_error(oracle, unlearned, kwargs, message):
    with pytest.raises(MatchingError) as err:
        klom(oracle, unlearned, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_summary_gives_the_95th_percentile_and_median_per_group():
    values = np.arange(100.0)[::-1]  # value at index i is 99 − i
    groups = {"forget": np.arange(100), "retain": [0, 1, 2, 3], "heldout": np.array([99])}
    summary = klom_summary(values, groups)
    # forget: 0..99, linear interpolation: 0.95·99 = 94.05; median 49.5. retain: {99, 98, 97, 96}.
    assert summary == {"forget": {"p95": pytest.approx(94.05), "median": 49.5},
                       "retain": {"p95": pytest.approx(98.85), "median": 97.5},
                       "heldout": {"p95": 0.0, "median": 0.0}}
    with pytest.raises(MatchingError, match="group 'retain' must be non-empty"):
        klom_summary(values, {"retain": []})
    with pytest.raises(MatchingError, match=r"indices in \[0, 100\)"):
        klom_summary(values, {"forget": [100]})


def test_spread_ratio_is_the_mean_sd_over_the_oracles_mean_sd():
    # oracle columns {0, 2} and {0, 4}: sds 1 and 2, mean 1.5; unlearned {0, 4} twice: sds 2 and 2, mean 2.
    oracle = np.array([[0.0, 0.0], [2.0, 4.0]])
    unlearned = np.array([[0.0, 0.0], [4.0, 4.0]])
    assert spread_ratio(oracle, unlearned) == pytest.approx(4 / 3, rel=1e-12)
    assert spread_ratio(oracle, oracle) == 1.0
    with pytest.raises(MatchingError, match="same points"):
        spread_ratio(oracle, unlearned[:, :1])


def test_noise_lowers_the_reference_klom_below_the_floor_and_the_spread_shows_it():
    """Why the report has spread_*: a second sample of the oracles' distribution is the floor; the same sample
    with noise added scores lower in KL(oracle ‖ unlearned), higher in the other direction, and its spread is > 1."""
    rng = np.random.default_rng(0)
    centre = rng.normal(0, 3, 2000)
    oracle, floor = (centre + rng.normal(0, 1, (50, 2000)) for _ in range(2))
    noisy = floor + rng.normal(0, 1.0, floor.shape)
    p95 = lambda x, **kw: np.percentile(klom(oracle, x, **kw), 95)  # noqa: E731
    assert p95(noisy) < 0.9 * p95(floor)  # 1.51 vs 1.73
    assert p95(noisy, direction="unlearned||oracle") > 1.2 * p95(floor, direction="unlearned||oracle")  # 2.36, 1.71
    assert spread_ratio(oracle, noisy) == pytest.approx(np.sqrt(2), rel=0.03)
    assert spread_ratio(oracle, floor) == pytest.approx(1.0, rel=0.03)
