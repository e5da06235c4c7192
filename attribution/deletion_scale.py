"""The deletion scales: datamodels fitted on α-subsets, calibrated to deletions from the full training set.

A datamodel fitted on subset models of α·n points predicts how outputs change with the training set *around
that size*; removing a point from half the data moves an output more than removing it from all of it. DM-Direct
asks what removing F from all of S does, so its prediction scales the fitted effect by two numbers,

    h(x) = f_x(θ0) − c_cross·Σ_{i∈F} β_{i,x,:} − (c_self − c_cross)·β_{x,x,:}·[x ∈ F],

c_self for a point's effect on itself and c_cross for every other: the first is measured on few (x, S') pairs
and is large, the second pools many small, noisy effects (TRAK's especially), and one slope over both would be
the noisy one's. They are fitted on M models trained on near-full subsets S'_j (α' = 0.95 by default) as the
least-squares fit of their outputs y_j(x) on the datamodels' predictions p_j(x) = b_x + Σ_{i∈S'_j} β_{i,x} split
into p^self_j(x) = β_{x,x}·[x ∈ S'_j] and p^cross = p − p^self (all centred over the M models), pooled over a
sample of fitted targets x. The outputs are the margins KLoM compares, taken along one pair of classes per x so
that they stay linear in the logits: m = f_{x,y_x} − f_{x,r_x}, r_x the class other than y_x with the largest mean
logit over the M models. All k logits, pooled, weighted the shift common to the k logits of x, which no margin
sees and the datamodels cannot predict, and gave a larger c_cross (digits: 0.81 on logits, 0.72 on margins;
README, "The deletion scales are fitted on margins"). (1, 1) is the uncalibrated datamodel; the group's attrs keep
them (`deletion_scale`), and a refit, which rewrites the attrs, drops them.

The training set's size. Every α-subset holds exactly α·n points, so the datamodels cannot tell what a point's
presence does from what one more point of any kind does: (β_{i,x} + t_x, b_x − α·n·t_x) fit them equally well,
and the L1 fit picks the sparsest t_x. A deletion shrinks S by |F| points, and that part of its effect is
measured instead: K models trained on all of S give ȳ_x(S), the datamodels' own models give
E_α[y_x] = b_x + α·Σ_{i∈S} β_{i,x} (the fit's intercept makes its residuals average 0), and the scaled model
y = a_x + c_cross·p^cross + c_self·p^self + γ'_x·|S'| through both has

    n·γ'_x = (ȳ_x(S) − b_x − α·Σ_{i∈S} β_{i,x}) / (1 − α) − c_cross·Σ_{i∈S, i≠x} β_{i,x} − c_self·β_{x,x},

kept as the group's array `size_effect` (|T| × k); DM-Direct subtracts |F|·γ'_x as well. (It is the secant
from α·n to n points, taken as the slope near n.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .class_removal import CALIBRATION_CLASS_MODELS, ClassRemoval, measure_class_removal
from .datasets import Dataset
from .engine import train_batched
from .errors import DmmError
from .fit_group import FitGroup
from .forget_spread import forget_spread, margins_of, masked_variance, subset_variances
from .models import require_consent
from .recipes import Recipe
from .subsets import block_seeds, block_subsets

# The calibration models' subsets and seeds are block CALIBRATION_BLOCK of the store's seed (attribution/subsets.py):
# no subset-model block reaches it, so they are never the fit's own models.
CALIBRATION_BLOCK = 2**32
CALIBRATION_MODELS = 64    # M (the defaults of `dmm calibrate` and of an evaluation's calibration stage)
CALIBRATION_ALPHA = 0.95   # α'
CALIBRATION_FULL_MODELS = 16  # K, trained on all of S (seeds: block CALIBRATION_BLOCK + 1); 0: no size term
CLASS_BLOCK = CALIBRATION_BLOCK + 2  # class c's K_c models on S ∖ S_c: block CLASS_BLOCK + c (class_removal.py)
SCALES_FITTED_ON = "margins"  # what c_self, c_cross are fitted on (module docstring); earlier stores: all k logits


ARRAY_FIELDS = ("size_effect", "forget_spread", "class_removal")  # DeletionScale's fields kept as arrays


def resolve_class_models(class_models: int | None, full_models: int) -> int:
    """K_c: as given, or by default (None) CALIBRATION_CLASS_MODELS where K >= 2 full-data models give Var_S, else 0;
    a one-line error for K_c > 0 without them."""
    if class_models is None:
        return CALIBRATION_CLASS_MODELS if full_models >= 2 else 0
    if class_models < 0 or (class_models and (class_models < 2 or full_models < 2)):
        raise DmmError(f"{class_models} class models with {full_models} full-data models: the whole-class term needs "
                       "K_c >= 2 models per class and K >= 2 full-data models; e.g. --class-models 4 --full-models 16 "
                       "(a spec's calibration_class_models, calibration_full_models), or 0 class models for none")
    return class_models


@dataclass(frozen=True)
class DeletionScale:
    """What `calibrate` measured (kept in the fit group's attrs as `deletion_scale`)."""
    scale_self: float   # c_self
    scale_cross: float  # c_cross
    models: int         # M
    alpha: float        # α' of their subsets
    targets: int        # how many fitted targets x the fit pools
    correlation: float  # of y and its fit c_self·p^self + c_cross·p^cross (centred margins), over the pooled (j, x)
    full_models: int = 0  # K (0: no size term)
    spread_gamma: float = 0.0  # γ of the forget spread s_x (attribution/forget_spread.py)
    size_effect: np.ndarray | None = field(default=None, compare=False, repr=False)  # n·γ'_x (|T|, k), not an attr
    forget_spread: np.ndarray | None = field(default=None, compare=False, repr=False)  # s_x (n_train,), not an attr
    fitted_on: str = SCALES_FITTED_ON  # the outputs c_self, c_cross were fitted on
    class_models: int = 0  # K_c per class (0: no whole-class term, attribution/class_removal.py)
    class_removal: ClassRemoval | None = field(default=None, compare=False, repr=False)  # Δ_c, s^c_x: not attrs

    def to_attrs(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ARRAY_FIELDS}

    @property
    def size_rms(self) -> float:
        """The root mean square of n·γ'_x over targets and classes (0 without a size term)."""
        return 0.0 if self.size_effect is None else float(np.sqrt(np.mean(self.size_effect ** 2)))


def sample_target_chunks(fit: FitGroup, max_targets: int, seed: int) -> list[int]:
    """Fitted target chunks, drawn at random until they hold ≥ max_targets targets (all of them if fewer)."""
    chunks = np.random.default_rng(seed).permutation(fit.num_chunks)
    picked, count = [], 0
    for chunk in map(int, chunks):
        if count >= max_targets:
            break
        picked.append(chunk)
        columns = fit.target_slice(chunk)
        count += columns.stop - columns.start
    return sorted(picked)


def least_squares_scales(y: np.ndarray, p_self: np.ndarray, p_cross: np.ndarray) -> tuple[float, float, float]:
    """(c_self, c_cross, correlation): y ≈ c_self·p_self + c_cross·p_cross, all (M, ...) centred over their first
    axis. Without any self term (no training point among the targets) c_self = c_cross, the one slope."""
    y, p_self, p_cross = (a - a.mean(axis=0) for a in (y, p_self, p_cross))
    gram = np.array([[(p_self * p_self).sum(), (p_self * p_cross).sum()],
                     [(p_self * p_cross).sum(), (p_cross * p_cross).sum()]])
    moments = np.array([(p_self * y).sum(), (p_cross * y).sum()])
    if gram[1, 1] == 0.0:
        raise DmmError("the datamodels predict the same output for every calibration model (β = 0 on the sampled "
                       "targets); fix: refit the store, or calibrate with more --models")
    if gram[0, 0] == 0.0:
        c_self = c_cross = moments[1] / gram[1, 1]
    else:
        c_self, c_cross = np.linalg.solve(gram, moments)
    fitted = c_self * p_self + c_cross * p_cross
    return float(c_self), float(c_cross), float((fitted * y).sum() / np.sqrt((fitted * fitted).sum() * (y * y).sum()))


def pair_margins(values: np.ndarray, labels: np.ndarray, runner_up: np.ndarray) -> np.ndarray:
    """values[..., x, y_x] − values[..., x, r_x] of (..., T, k) values: a margin along a fixed pair, linear in them."""
    rows = np.arange(len(labels))
    return values[..., rows, labels] - values[..., rows, runner_up]


def runner_up_classes(mean_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """r_x: the class other than y_x with the largest of the (T, k) mean logits."""
    others = np.array(mean_logits, dtype=np.float64, copy=True)
    others[np.arange(len(labels)), labels] = -np.inf
    return others.argmax(axis=1)


def size_effect(full_mean: np.ndarray, bias: np.ndarray, total: np.ndarray, own: np.ndarray, alpha: float,
                c_self: float, c_cross: float) -> np.ndarray:
    """n·γ'_x (module docstring) from ȳ_x(S), b_x, Σ_{i∈S} β_{i,x} and β_{x,x} (0 for held-out x), all (|T|, k)."""
    return (full_mean - bias - alpha * total) / (1 - alpha) - c_cross * (total - own) - c_self * own


def _full_data_logits(fit: FitGroup, data: Dataset, full_models: int, device: str) -> np.ndarray:
    """Logits (K, p, k) of K models trained on all of S (the store's model, recipe and seed), float64."""
    spec = fit.store.spec
    everything = np.ones((full_models, data.n_train), dtype=bool)
    seeds = block_seeds(spec.seed, CALIBRATION_BLOCK + 1, full_models)
    trained = train_batched(spec.model, data, Recipe.from_dict(spec.recipe), seeds, everything, device)
    return trained.logits.cpu().numpy().astype(np.float64)


def _full_data_size_effect(fit: FitGroup, full_mean: np.ndarray, c_self: float, c_cross: float) -> np.ndarray:
    """n·γ'_x of every fitted target from the full-data models' mean logits ȳ(S) on the fitted targets."""
    rows = np.arange(fit.store.spec.n_train)
    total, own_rows = fit.sum_and_own_rows(rows)
    own = np.zeros_like(total)
    columns = fit.target_columns(rows)
    own[columns[columns >= 0]] = own_rows[columns >= 0]
    return size_effect(full_mean, fit.read_bias().astype(np.float64), total, own, fit.store.spec.alpha, c_self,
                       c_cross)


def calibrate(fit: FitGroup, data: Dataset, models: int = CALIBRATION_MODELS, alpha: float = CALIBRATION_ALPHA,
              max_targets: int = 1024, device: str = "cpu", trust_code: bool = False,
              full_models: int = CALIBRATION_FULL_MODELS, class_models: int | None = None) -> DeletionScale:
    """Train M models on α'-subsets of S (the store's model, recipe and seed) and fit c_self, c_cross and the forget
    spread (γ, s_x), then K on all of S for the size effect (K = 0: none) and K_c per class on S ∖ S_c for whole-class
    deletions (`resolve_class_models`; 0: none); nothing is written. A `module:callable` model named by the store is
    imported only with `trust_code`."""
    spec = fit.store.spec
    require_consent(spec.model, f"store {fit.store.url}", trust_code)
    if models < 2 or full_models < 0:
        raise DmmError(f"--models {models} / --full-models {full_models}: the fit needs at least 2 calibration "
                       "models and K >= 0 full-data models; e.g. --models 64 --full-models 16")
    class_models = resolve_class_models(class_models, full_models)
    masks, seeds = block_subsets(spec.seed, CALIBRATION_BLOCK, models, data.n_train, alpha)
    columns = [fit.target_slice(c) for c in sample_target_chunks(fit, max_targets, spec.seed)]
    points = np.concatenate([fit.fitted_points()[sl] for sl in columns])
    beta = np.concatenate([np.asarray(fit.weight[:, sl, :]) for sl in columns], axis=1)
    bias = np.concatenate([np.asarray(fit.bias[sl, :]) for sl in columns], axis=0)
    predicted = bias[None] + (masks.astype(np.float32) @ beta.reshape(len(beta), -1)).reshape(models, *bias.shape)
    predicted = predicted.astype(np.float64)
    own = np.zeros_like(predicted)  # p^self: β_{x,x}·[x ∈ S'_j] for the targets that are training points
    train = np.flatnonzero(points < data.n_train)
    own[:, train] = masks[:, points[train], None] * beta[points[train], train][None]
    trained = train_batched(spec.model, data, Recipe.from_dict(spec.recipe), seeds, masks, device)
    observed = trained.logits[:, points].cpu().numpy().astype(np.float64)
    target_labels = data.all_labels().numpy()[points]
    runner_up = runner_up_classes(observed.mean(axis=0), target_labels)
    c_self, c_cross, correlation = least_squares_scales(
        *(pair_margins(a, target_labels, runner_up) for a in (observed, own, predicted - own)))
    full = _full_data_logits(fit, data, full_models, device) if full_models else None
    size = None if full is None else _full_data_size_effect(fit, full[:, fit.fitted_points()].mean(axis=0), c_self,
                                                            c_cross)
    labels, n = data.y_train.numpy(), data.n_train
    if full_models >= 2:  # seed-only variance, as the retrained models': all of them train on the same set
        reference = masked_variance(margins_of(full[:, :n], labels), np.ones((full_models, n), dtype=bool))
    else:  # the α'-models', whose subsets differ too: a little above it
        reference = masked_variance(margins_of(trained.logits[:, :n].cpu().numpy(), labels), masks)
    gamma, spread = forget_spread(*subset_variances(fit.store, labels), reference)
    whole = None if not class_models else measure_class_removal(spec, data, class_models, full, fit.fitted_points(),
                                                                CLASS_BLOCK, device)
    return DeletionScale(c_self, c_cross, models, alpha, len(points), correlation, full_models, gamma,
                         size_effect=size, forget_spread=spread, class_models=class_models, class_removal=whole)
