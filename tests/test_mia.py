"""Membership inference (matching/mia.py): features, the SVC and entropy attacks, U-LiRA."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from matching.errors import MatchingError
from matching.mia import mia_entropy, mia_svc, prediction_entropy, shadow_sets, true_class_confidence, ulira_auc

K = 10
CONFIDENT = np.r_[20.0, np.zeros(K - 1)]  # label 0 with probability ≈ 1 (1 − 9e^-20)
HALF = np.r_[math.log(K - 1), np.zeros(K - 1)]  # label 0 with probability 9 / (9 + 9) = 0.5


def test_features_by_hand():
    logits = np.stack([CONFIDENT, HALF, np.zeros(K)])
    np.testing.assert_allclose(true_class_confidence(logits, [0, 0, 3]), [1 / (1 + 9 * math.exp(-20)), 0.5, 0.1])
    # HALF: p = (.5, 1/18 × 9): H = .5 log 2 + 9 · (1/18) log 18; uniform: log 10.
    np.testing.assert_allclose(prediction_entropy(logits)[1:], [0.5 * math.log(2) + 0.5 * math.log(18), math.log(K)])
    assert prediction_entropy(logits)[0] < 1e-6


def constructed(forget_like: np.ndarray, n_forget=20, n_retain=60, n_heldout=40):
    """Rows: F (forget_like), retain (confidence 1), held-out (confidence 0.5); every label 0."""
    logits = np.concatenate([np.tile(forget_like, (n_forget, 1)), np.tile(CONFIDENT, (n_retain, 1)),
                             np.tile(HALF, (n_heldout, 1))])
    groups = {"forget": np.arange(n_forget), "retain": n_forget + np.arange(n_retain),
              "heldout": n_forget + n_retain + np.arange(n_heldout)}
    return logits, np.zeros(len(logits), dtype=np.int64), groups


@pytest.mark.parametrize("attack", [mia_svc, mia_entropy])
def test_attacks_call_confident_forget_points_members_and_unsure_ones_non_members(attack):
    assert attack(*constructed(CONFIDENT)) == 0.0  # looks like training data: not forgotten
    assert attack(*constructed(HALF)) == 1.0  # looks like held-out data: forgotten
    logits, labels, groups = constructed(CONFIDENT)
    logits[:5] = HALF  # a quarter of F forgotten
    assert attack(logits, labels, groups) == 0.25


def test_shadow_sets_are_balanced_seeded_samples():
    members, nonmembers = shadow_sets(np.arange(100), np.arange(100, 130), seed=3)
    assert len(members) == len(nonmembers) == 30 and len(set(members)) == 30
    assert set(members) <= set(range(100)) and set(nonmembers) == set(range(100, 130))
    np.testing.assert_array_equal(members, shadow_sets(np.arange(100), np.arange(100, 130), seed=3)[0])
    assert not np.array_equal(members, shadow_sets(np.arange(100), np.arange(100, 130), seed=4)[0])
    with pytest.raises(MatchingError, match="needs retain and held-out points"):
        shadow_sets(np.arange(5), [], seed=0)


def test_attacks_reject_an_empty_forget_set():
    logits, labels, groups = constructed(CONFIDENT)
    with pytest.raises(MatchingError, match="forget group is empty"):
        mia_svc(logits, labels, {**groups, "forget": []})


def reference_ulira(unlearned, oracle, seed):
    """The documented rule written as a loop over points with scipy's normal and sklearn's AUC."""
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(unlearned)), rng.permutation(len(oracle))]
    halves = [(pop[o[:len(pop) // 2]], pop[o[len(pop) // 2:]]) for pop, o in zip((unlearned, oracle), orders)]
    pos, neg = [], []
    for x in range(unlearned.shape[1]):
        (fu, su), (fo, so) = [(fit[:, x], scored[:, x]) for fit, scored in halves]
        gu, go = norm(fu.mean(), max(fu.std(), 1e-6)), norm(fo.mean(), max(fo.std(), 1e-6))
        pos += list(gu.logpdf(su) - go.logpdf(su))
        neg += list(gu.logpdf(so) - go.logpdf(so))
    return roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])


def test_ulira_matches_a_loop_over_points():
    rng = np.random.default_rng(0)
    unlearned = rng.normal(0.3, 1.0, (21, 15)) + rng.normal(size=15)
    oracle = rng.normal(0.0, 1.3, (17, 15)) + rng.normal(size=15)
    got = ulira_auc(unlearned, oracle, seed=5)
    assert got == pytest.approx(reference_ulira(unlearned, oracle, seed=5), abs=1e-12)
    assert 0.55 < got < 0.95


def test_ulira_is_chance_on_identical_populations_and_one_when_separated():
    rng = np.random.default_rng(1)
    n, points = 100, 50
    centres = rng.normal(0, 3, points)  # every point its own margin distribution
    unlearned, oracle = centres + rng.normal(size=(n, points)), centres + rng.normal(size=(n, points))
    # Null AUC with n1 = n2 = (n/2)·points scored pairs: sd = sqrt((n1 + n2 + 1) / (12 n1 n2)); 5 sd band.
    pairs = n // 2 * points
    band = 5 * math.sqrt((2 * pairs + 1) / (12 * pairs * pairs))
    assert abs(ulira_auc(unlearned, oracle, seed=0) - 0.5) < band
    assert ulira_auc(centres + 4 + rng.normal(size=(n, points)), oracle, seed=0) > 0.99
    constant = np.zeros((8, 3))
    assert ulira_auc(constant, constant) == 0.5  # no spread anywhere: every score ties


@pytest.mark.parametrize("unlearned, oracle, message", [
    (np.zeros((10, 3)), np.zeros((10, 4)), "same points"),
    (np.zeros((3, 3)), np.zeros((10, 3)), ">= 4 models"),
    (np.full((10, 3), np.inf), np.zeros((10, 3)), "finite margins"),
])
def test_ulira_bad_input(unlearned, oracle, message):
    with pytest.raises(MatchingError, match=message):
        ulira_auc(unlearned, oracle)
