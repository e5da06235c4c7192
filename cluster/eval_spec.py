"""The experiment spec of `dmm evaluate` (YAML): what to compare, on what, with which oracles.

```yaml
dataset: digits            # digits | mnist1d | cifar10 | npz:PATH | npy:DIR
model: mlp                 # default: the dataset's
recipe: digits-mlp         # name or JSON/YAML file (`dmm recipes`); default: the (dataset, model) pair's.
                           # A reused store fixes model and recipe: both must then match it.
seed: 0                    # originals use seeds seed..seed+N−1; the oracle sets draw their own
models: 100                # N: originals, and oracles per forget set (twice: oracles and the floor)
attribution:               # where DM-Direct's β comes from
  store: demo_out/store.zarr   # reuse this store (the product's point); built there if absent
  num_models: 2048             # build (or grow) the store to m >= 6 subset models; omit to only reuse
                               # (below 200 models a fifth, not 100, is held out for the LDS)
  alpha: 0.5
  block_size: 64
  source: datamodels           # datamodels | trak
  calibration_models: 64       # M models on α'-subsets fit β's deletion scales (`dmm calibrate`); 0: the store's
  calibration_alpha: 0.95      # α'
  calibration_full_models: 16  # K models on all of S measure the training set size's effect; 0: none
  calibration_class_models: 16 # K_c models per class on S minus the class measure whole-class deletions; 0: none
                               # (omitted: 16 where K >= 2, else 0)
forget_sets: [random:50:0, class:3:50, pc:1:50:top]
methods:                   # name: hyperparameters (the fields of its config class in matching.methods)
  nothing: {}
  retrain: {}
  dm-direct: {}
  dmm: {}
  om: {}                   # METHOD@LABEL runs METHOD again with other hyperparameters, e.g. dmm@slow: {lr: 1.0e-3}
metrics:
  klom_direction: oracle||unlearned   # KL(p‖q), p first; or unlearned||oracle
  relearn_models: 10                  # models per method whose relearn time is measured
```

Unknown keys and bad values get a one-line error that names the valid ones. Relative paths are taken
from the current directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from attribution.deletion_scale import (CALIBRATION_ALPHA, CALIBRATION_FULL_MODELS, CALIBRATION_MODELS,
                                        resolve_class_models)
from attribution.errors import DmmError
from attribution.lds import MIN_MODELS
from matching.forget_sets import parse_forget_set

from .eval_methods import EVAL_METHODS, base_method, method_config

KLOM_DIRECTIONS = ("oracle||unlearned", "unlearned||oracle")
ATTRIBUTION_SOURCES = ("datamodels", "trak")


class SpecError(DmmError):
    """An unusable experiment spec; the message names the valid keys or values."""


def _take(section: str, raw, cls):
    """Instantiate dataclass `cls` from mapping `raw`, refusing unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"`{section}` must be a mapping; give key: value lines")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SpecError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                        f"`{section}`; valid keys: {', '.join(known)}")
    for name, value in raw.items():
        want = known[name].type
        kinds = {"int": (int,), "float": (int, float), "str": (str,), "str | None": (str, type(None)),
                 "int | None": (int, type(None))}.get(want, (object,))
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise SpecError(f"`{section}.{name}` is {value!r}; give a {want.replace(' | None', '')}")
    return cls(**raw)


@dataclass(frozen=True)
class AttributionSource:
    store: str | None = None
    num_models: int | None = None
    alpha: float = 0.5
    block_size: int = 64
    source: str = "datamodels"
    calibration_models: int = CALIBRATION_MODELS
    calibration_alpha: float = CALIBRATION_ALPHA
    calibration_full_models: int = CALIBRATION_FULL_MODELS
    calibration_class_models: int | None = None  # K_c; None: `resolve_class_models`'s default

    def __post_init__(self):
        if self.store is None and self.num_models is None:
            raise SpecError("`attribution` needs `store` (a store to reuse) or `num_models` (m to build one)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise SpecError(f"`attribution.block_size` is {self.block_size!r}; give a positive int (64 by default)")
        if self.num_models is not None and -(-self.num_models // self.block_size) * self.block_size < MIN_MODELS:
            raise SpecError(f"`attribution.num_models` is {self.num_models} (in blocks of {self.block_size}); give "
                            f"m >= {MIN_MODELS}: the fit holds out 3 models for the LDS and needs 3 to fit on")
        if not 0 < self.alpha < 1:
            raise SpecError(f"`attribution.alpha` is {self.alpha}; give 0 < α < 1 (0.5 by default)")
        if (self.calibration_models < 0 or self.calibration_models == 1 or not 0 < self.calibration_alpha < 1
                or self.calibration_full_models < 0):
            raise SpecError(f"`attribution.calibration_models` {self.calibration_models} / `calibration_alpha` "
                            f"{self.calibration_alpha} / `calibration_full_models` {self.calibration_full_models}: "
                            "give M = 0 (keep the store's calibration) or M >= 2, 0 < α' < 1 and K >= 0")
        try:
            resolve_class_models(self.calibration_class_models, self.calibration_full_models)
        except DmmError as e:
            raise SpecError(f"`attribution.calibration_class_models`: {e}") from None
        if self.source not in ATTRIBUTION_SOURCES:
            raise SpecError(f"`attribution.source` is {self.source!r}; use one of {', '.join(ATTRIBUTION_SOURCES)}")


@dataclass(frozen=True)
class MetricSettings:
    klom_direction: str = "oracle||unlearned"
    relearn_models: int = 10
    relearn_lr: float = 1e-3
    relearn_batch_size: int = 32
    relearn_max_steps: int = 200
    mia_models: int = 100

    def __post_init__(self):
        if self.klom_direction not in KLOM_DIRECTIONS:
            raise SpecError(f"`metrics.klom_direction` is {self.klom_direction!r}; use one of "
                            f"{', '.join(KLOM_DIRECTIONS)}")
        if min(self.relearn_models, self.mia_models) < 0 or self.relearn_max_steps < 1 or self.relearn_batch_size < 1:
            raise SpecError("`metrics` counts must be >= 0 and relearn steps/batch >= 1; fix them")


@dataclass(frozen=True)
class ExperimentSpec:
    dataset: str
    attribution: AttributionSource
    forget_sets: tuple[str, ...]
    methods: dict[str, dict]
    model: str | None = None
    recipe: str | None = None
    seed: int = 0
    models: int = 100
    metrics: MetricSettings = field(default_factory=MetricSettings)


TOP_KEYS = ("dataset", "model", "recipe", "seed", "models", "attribution", "forget_sets", "methods", "metrics")


def spec_from_dict(raw: dict, base: Path = Path(".")) -> ExperimentSpec:
    """Validate a parsed spec; `base` resolves relative paths (store, ids: files)."""
    if not isinstance(raw, dict):
        raise SpecError(f"the spec must be a YAML mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise SpecError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"valid keys: {', '.join(TOP_KEYS)}")
    for key in ("dataset", "attribution", "forget_sets", "methods"):
        if key not in raw:
            raise SpecError(f"the spec has no `{key}`; add it (see configs/digits.yaml)")
    if not isinstance(raw["dataset"], str) or any(raw.get(k) is not None and not isinstance(raw[k], str)
                                                  for k in ("model", "recipe")):
        raise SpecError("`dataset`, `model` and `recipe` must be names or paths (e.g. digits, mlp, digits-mlp)")
    for key in ("seed", "models"):
        if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], int)):
            raise SpecError(f"`{key}` is {raw[key]!r}; give an integer")
    if raw.get("models", 100) < 2:
        raise SpecError(f"`models` is {raw['models']}; KLoM compares populations: give N >= 2 (100 in the reference)")
    attribution = _take("attribution", raw["attribution"], AttributionSource)
    if attribution.store is not None:
        attribution = AttributionSource(**{**attribution.__dict__, "store": _resolve(attribution.store, base)})
    sets = raw["forget_sets"]
    if not isinstance(sets, list) or not sets:
        raise SpecError("`forget_sets` must be a non-empty list, e.g. [random:50:0, class:3:50, pc:1:50:top]")
    sets = [_resolve_ids(str(s), base) for s in sets]
    for s in sets:
        parse_forget_set(s)
    if len(set(sets)) != len(sets):
        raise SpecError("`forget_sets` names a set twice; list each once")
    methods = raw["methods"]
    if not isinstance(methods, dict) or not methods:
        raise SpecError(f"`methods` must map method names to hyperparameters; valid methods: {', '.join(EVAL_METHODS)}")
    checked = {}
    for name, params in methods.items():
        if base_method(name) not in EVAL_METHODS:
            raise SpecError(f"unknown method {name!r}; valid methods: {', '.join(EVAL_METHODS)} "
                            "(a variant is METHOD@LABEL, e.g. dmm@lr1e-2)")
        checked[name] = method_config(base_method(name), params or {})
    recipe = raw.get("recipe")
    if recipe is not None and Path(recipe).suffix in (".json", ".yaml", ".yml"):
        recipe = _resolve(recipe, base)
    return ExperimentSpec(dataset=raw["dataset"], model=raw.get("model"), recipe=recipe, seed=raw.get("seed", 0),
                          models=raw.get("models", 100), attribution=attribution, forget_sets=tuple(sets),
                          methods=checked, metrics=_take("metrics", raw.get("metrics"), MetricSettings))


def _resolve(path: str, base: Path) -> str:
    return path if "://" in path else os.path.abspath(base / path)


def _resolve_ids(spec: str, base: Path) -> str:
    return f"ids:{_resolve(spec[4:], base)}" if spec.startswith("ids:") else spec


def load_spec(path: str | os.PathLike) -> ExperimentSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec {path} does not exist; give a YAML file such as configs/digits.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"spec {path} is not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    return spec_from_dict(raw, Path.cwd())
