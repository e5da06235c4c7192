"""What an attribution store is built for: its spec, schema, errors and the diff that names a mismatch.

One store per (dataset fingerprint, model, recipe) (DESIGN.md §4): :class:`StoreSpec` is that
identity plus the shape (n_train, n_points, k). :func:`spec_diff` lists every attribute a request
disagrees with; it backs every ``StoreMismatch`` message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .errors import DmmError
from .recipes import Recipe

SCHEMA_VERSION = 1
STORE_KIND = "dmm-attribution-store"


class StoreError(DmmError):
    """A store problem; the message is one line naming the problem and the fix."""


class StoreMismatch(StoreError):
    """The store was built for a different request (dataset, model, recipe, ...)."""


# --------------------------------------------------------------------------- schema

_SCHEMA_ROWS: tuple[tuple[str, str, str, str, str], ...] = (
    ("`/` (group attrs)", "—", "—", "—",
     "schema_version, kind, dataset, fingerprint (sha256), model, recipe (JSON), alpha, "
     "seed, block_size, n_train, n_points, num_classes, num_models_requested"),
    ("`subsets/masks`", "m × n", "bool", "block_size × n",
     "row j: which training points subset model j was trained on"),
    ("`subsets/logits`", "m × p × k", "float32",
     "shards block_size × ⌈p / T⌉·T × k (one per block) of inner chunks block_size × T × k",
     "logits of subset model j on every train, then held-out, point; attr target_chunk = T = min(256, p), the fit's "
     "default, so a fit task reads only its targets' inner chunks (stores from before sharding: one chunk "
     "block_size × p × k, read as they are)"),
    ("`subsets/done`", "m / block_size", "bool", "1",
     "block b complete (set after its masks and logits); readers see marked blocks only"),
    ("`datamodels/weight`", "n × p × k", "float32", "row_chunk × target_chunk × k",
     "β_{i,x,c}: effect of training point i on logit c of target x"),
    ("`datamodels/weight_rows`", "n × p × k", "float32", "1 × p × k",
     "`weight` again, one chunk per training row, written once all target chunks are done; read by requests "
     "(one object per forget id) only when attr complete is true, else they read `weight`"),
    ("`datamodels/bias`", "p × k", "float32", "target_chunk × k", "β0_{x,c} intercept"),
    ("`datamodels/lam`", "p × k", "float32", "target_chunk × k",
     "chosen L1 strength λ per regression (NaN = not fitted)"),
    ("`datamodels/lds`", "p × k", "float32", "target_chunk × k",
     "linear datamodeling score per target/class (0 = constant prediction; NaN = not measured or constant output)"),
    ("`datamodels/lds_margin`", "p", "float32", "target_chunk",
     "linear datamodeling score of the margin of target x (as `lds`)"),
    ("`datamodels/done`", "⌈p / target_chunk⌉", "bool", "1",
     "target chunk c fitted (set after weight/bias/lam/lds)"),
    ("`datamodels/target_ids`", "\\|T\\|", "int64", "\\|T\\|",
     "only in a fit for a target subset (`dmm fit --targets random:T:SEED` or `ids:FILE`; group attr `targets` = "
     "the spec): the point id of each β column, sorted. Every p above is then \\|T\\| (β n × \\|T\\| × k); a fit "
     "of `all` has neither"),
    ("`datamodels/size_effect`", "p × k", "float32", "p × k",
     "n·γ'_{x,c}: the training set size's effect, written by `dmm calibrate --full-models K` (K > 0) with the "
     "group attr `deletion_scale`, which names K; DM-Direct subtracts \\|F\\|·γ'"),
    ("`datamodels/forget_spread`", "n", "float32", "n",
     "s_x: a retrained model's extra margin sd on training point x (attribution/forget_spread.py), written by "
     "`dmm calibrate` with `deletion_scale`, whose spread_gamma is its γ; DMM adds a·s_x·N(0, 1) to the "
     "true-class targets of F (a = 1 by default, `--spread a`)"),
    ("`datamodels/class_shift`", "C × p × k", "float32", "C × p × k",
     "Δ_c(x): the mean logits' shift when all of class c leaves S (attribution/class_removal.py), written by "
     "`dmm calibrate --class-models K_c` (K_c > 0, with K ≥ 2) with `deletion_scale`, which names K_c; DM-Direct "
     "adds it for every class F holds whole"),
    ("`datamodels/class_spread`, `datamodels/class_labels`", "n", "float32, int32", "n",
     "s^c_x, x's extra margin sd over seeds when all of its class leaves S (DMM's spread on such an F, one draw per "
     "class), and the labels y_x that define the classes"),
    ("`datamodels/` (group attrs)", "—", "—", "—",
     "kind, target_chunk, row_chunk, the fit's config; `deletion_scale` once `dmm calibrate` ran: scale_self, "
     "scale_cross, models, alpha, targets, correlation, full_models, spread_gamma, fitted_on (margins), "
     "class_models (a refit drops it, `size_effect`, `forget_spread` and the class arrays: c = 1)"),
    ("`trak/*`", "as `datamodels/*`", "as `datamodels/*`", "as `datamodels/*`",
     "the same matrices estimated by TRAK; attr config.calibration_blocks: the subset blocks it calibrates on; "
     "its own `deletion_scale`, `size_effect`, `forget_spread` and class arrays"),
    ("`trak/checkpoints/<name>`", "C × shape", "as the model", "C × shape",
     "state-dict entry `name` of the C checkpoints TRAK scores with (attrs count, names set after data)"),
    ("`original/logits`", "p × k", "float32", "p × k",
     "logits of the original model θ0; attr model_sha256 names its file (set after data)"),
)


def schema_table() -> str:
    """The store schema as a README-ready Markdown table."""
    head = "| array | shape | dtype | chunks | meaning |\n|---|---|---|---|---|\n"
    body = "".join("| " + " | ".join(r) + " |\n" for r in _SCHEMA_ROWS)
    foot = (
        "\nm = allocated subset models (multiple of block_size), n = n_train, "
        "p = n_points (train points first, then held-out), k = num_classes. "
        "Every array has attrs `fingerprint` and `schema_version`; codec zstd level 3."
    )
    return head + body + foot


# --------------------------------------------------------------------------- spec


def norm_json(value: Any, what: str) -> Any:
    """JSON round-trip so tuples/lists and key order compare like the stored copy."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"{what} is not plain JSON ({exc}); fix: pass only str/int/float/bool/list/dict values"
        ) from None


@dataclass(frozen=True)
class StoreSpec:
    """What a request expects the store to be (the store's identity + shape)."""

    dataset: str
    fingerprint: str
    model: str
    recipe: dict
    alpha: float
    seed: int
    block_size: int
    n_train: int
    n_points: int
    num_classes: int

    def __post_init__(self) -> None:
        for name in ("dataset", "fingerprint", "model"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise StoreError(f"StoreSpec.{name} must be a non-empty string, got {v!r}; fix: pass it")
        if not isinstance(self.recipe, dict):
            raise StoreError(f"StoreSpec.recipe must be a dict, got {type(self.recipe).__name__}; fix: pass a JSON dict")
        object.__setattr__(self, "recipe", norm_json(self.recipe, "StoreSpec.recipe"))
        alpha = float(self.alpha)
        if not 0.0 < alpha < 1.0:
            raise StoreError(f"StoreSpec.alpha must be in (0, 1), got {self.alpha!r}; fix: use e.g. 0.5")
        object.__setattr__(self, "alpha", alpha)
        for name in ("seed", "block_size", "n_train", "n_points", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise StoreError(f"StoreSpec.{name} must be an int, got {v!r}; fix: pass an int")
            object.__setattr__(self, name, int(v))
        for name in ("block_size", "n_train", "num_classes"):
            if getattr(self, name) < 1:
                raise StoreError(f"StoreSpec.{name} must be >= 1, got {getattr(self, name)}; fix: pass a positive int")
        if self.n_points < self.n_train:
            raise StoreError(
                f"StoreSpec.n_points ({self.n_points}) < n_train ({self.n_train}); "
                "fix: n_points counts train points then held-out points"
            )

    def to_attrs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_attrs(cls, attrs: dict) -> "StoreSpec":
        return cls(**{f.name: attrs[f.name] for f in fields(cls)})



SPEC_KEYS = tuple(f.name for f in fields(StoreSpec))


RECIPE_DEFAULTS = Recipe().to_dict()


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "recipe":  # a field added to Recipe later is absent from older stores: compare with defaults filled in
        if isinstance(a, dict) and isinstance(b, dict):
            a, b = ({**RECIPE_DEFAULTS, **r} for r in (a, b))
        return norm_json(a, "recipe") == norm_json(b, "recipe")
    if key == "alpha":
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def short_value(v: Any) -> str:
    """A value as a message shows it: JSON (a string repr'd), cut to 48 characters."""
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 48 else s[:45] + "..."


def spec_diff(stored: dict, expected: dict) -> list[str]:
    """``key store=... request=...`` for every key of ``expected`` that ``stored`` disagrees with."""
    out = []
    for key, want in expected.items():
        have = stored.get(key)
        if _same(key, have, want):
            continue
        if key == "recipe" and isinstance(have, dict) and isinstance(want, dict):
            want = norm_json(want, "recipe")
            sub = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            detail = ", ".join(f"recipe.{k} store={short_value(have.get(k))} request={short_value(want.get(k))}" for k in sub)
            out.append(detail or f"recipe store={short_value(have)} request={short_value(want)}")
        else:
            out.append(f"{key} store={short_value(have)} request={short_value(want)}")
    return out
