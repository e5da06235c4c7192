"""Membership inference on the forget set F: the literature's two one-model attacks and U-LiRA.

One-model attacks (SalUn's and SCRUB's protocols): a classifier learns member (1) vs non-member (0)
from one scalar feature of the model's output on a shadow set — a random retain sample (members) and
as many held-out points (non-members) — and is applied to F. The score is the fraction of F predicted
NON-member: retraining scores near the held-out rate, θ0 near 0.
  (a) `mia_svc`: SVC (rbf, C = 3, gamma "auto") on the true-class confidence softmax(f(x))_y.
  (b) `mia_entropy`: logistic regression (balanced classes) on the prediction entropy −Σ_c p_c log p_c.
(c) `ulira_auc`: population attack between the unlearned models and the oracles, per x ∈ F.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC

from .errors import MatchingError

ULIRA_MIN_MODELS = 4  # each population splits in halves: ≥ 2 models fit the Gaussians, ≥ 2 are scored


def true_class_confidence(logits, labels) -> np.ndarray:
    """softmax(logits)_y per point (n,)."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)
    return probs.gather(-1, torch.as_tensor(labels, dtype=torch.long).unsqueeze(-1)).squeeze(-1).numpy()


def prediction_entropy(logits) -> np.ndarray:
    """−Σ_c p_c log p_c of p = softmax(logits), per point (n,)."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)
    return -(logp.exp() * logp).sum(-1).numpy()


def shadow_sets(retain, heldout, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(members, non-members): equal-size random samples of the retain and held-out indices."""
    retain, heldout = np.asarray(retain, dtype=np.int64), np.asarray(heldout, dtype=np.int64)
    size = min(len(retain), len(heldout))
    if size == 0:
        raise MatchingError(f"the shadow set needs retain and held-out points, got {len(retain)} and {len(heldout)}; "
                            "give both groups")
    rng = np.random.default_rng(seed)
    return rng.choice(retain, size, replace=False), rng.choice(heldout, size, replace=False)


def _fraction_predicted_nonmember(classifier, feature: np.ndarray, groups: dict, seed: int) -> float:
    members, nonmembers = shadow_sets(groups["retain"], groups["heldout"], seed)
    forget = np.asarray(groups["forget"], dtype=np.int64)
    if forget.size == 0:
        raise MatchingError("the forget group is empty; give the indices of F")
    x = feature[np.concatenate([members, nonmembers])].reshape(-1, 1)
    y = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    classifier.fit(x, y)
    return float(1.0 - classifier.predict(feature[forget].reshape(-1, 1)).mean())


def mia_svc(logits, labels, groups: dict, seed: int = 0) -> float:
    """SalUn's MIA-efficacy: fraction of F an rbf SVC (C = 3) on true-class confidence calls non-member.

    logits (n_points, k) and labels (n_points,) on every point; groups: forget/retain/heldout indices.
    """
    return _fraction_predicted_nonmember(SVC(C=3, gamma="auto", kernel="rbf"),
                                         true_class_confidence(logits, labels), groups, seed)


def mia_entropy(logits, labels, groups: dict, seed: int = 0) -> float:
    """SCRUB's attack, as a fraction of F a logistic regression on prediction entropy calls non-member.

    (SCRUB reports the fraction called member, i.e. 1 − this.) `labels` is unused by the feature but
    kept so both attacks take the same arguments.
    """
    del labels
    return _fraction_predicted_nonmember(LogisticRegression(class_weight="balanced", solver="lbfgs"),
                                         prediction_entropy(logits), groups, seed)


def _halves(margins: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fit, scored): the models of a permutation's first ⌊N/2⌋ places, and the rest."""
    order = rng.permutation(len(margins))
    return margins[order[:len(margins) // 2]], margins[order[len(margins) // 2:]]


def ulira_auc(unlearned_margins, oracle_margins, seed: int = 0, min_std: float = 1e-6) -> float:
    """AUC of a per-example likelihood-ratio attack telling unlearned models from oracles on F.

    Inputs (N_u, |F|) and (N_o, |F|). Each population's models are split by a seeded permutation
    (rng = default_rng(seed): first the unlearned, then the oracle permutation); the first ⌊N/2⌋ fit
    a Gaussian per x (mean, std floored at min_std), the rest are scored by
    log N(m; μ_u, σ_u) − log N(m; μ_o, σ_o). AUC over all scored (x, model) pairs, unlearned = positive:
    0.5 means the unlearned models are indistinguishable from retraining, 1 fully distinguishable.
    """
    unlearned = np.asarray(unlearned_margins, dtype=np.float64)
    oracle = np.asarray(oracle_margins, dtype=np.float64)
    if unlearned.ndim != 2 or oracle.ndim != 2 or unlearned.shape[1] != oracle.shape[1]:
        raise MatchingError(f"U-LiRA needs (models, |F|) margins on the same points, got {unlearned.shape} and "
                            f"{oracle.shape}; stack one row per model")
    finite = np.isfinite(unlearned).all() and np.isfinite(oracle).all()
    if min(len(unlearned), len(oracle)) < ULIRA_MIN_MODELS or not finite:
        raise MatchingError(f"U-LiRA needs >= {ULIRA_MIN_MODELS} models per population and finite margins, got "
                            f"{len(unlearned)} unlearned and {len(oracle)} oracles; add models or drop diverged ones")
    rng = np.random.default_rng(seed)
    (fit_u, scored_u), (fit_o, scored_o) = _halves(unlearned, rng), _halves(oracle, rng)
    mu_u, sd_u = fit_u.mean(axis=0), np.maximum(fit_u.std(axis=0), min_std)
    mu_o, sd_o = fit_o.mean(axis=0), np.maximum(fit_o.std(axis=0), min_std)
    scores = [norm.logpdf(m, mu_u, sd_u) - norm.logpdf(m, mu_o, sd_o) for m in (scored_u, scored_o)]
    truth = np.concatenate([np.ones(scores[0].size), np.zeros(scores[1].size)])
    return float(roc_auc_score(truth, np.concatenate([scores[0].ravel(), scores[1].ravel()])))
