"""TRAK: the cheap estimate of the datamodel matrix β (DESIGN.md §1), written under ``trak/``.

TRAK (Park et al. 2023, package ``traker``) scores train point i for a target output g(x) as
τ[i, x] = ∇g(x)ᵀ (ΦᵀΦ)⁻¹ φ_i · Q_i, averaged over C checkpoints θ^(1..C) (models trained on all of S,
seeds 0..C−1, the store's model and recipe), with φ_i the projected gradient of train point i's
margin and Q_i = 1 − p_i (its correct-class softmax probability). The checkpoints are trained once,
kept in ``trak/checkpoints`` before the first chunk is scored, and reused by every resumed run.

Class mapping. DM-Direct needs β for all k logits: h(x) = f_x(θ0) − Σ_{i∈F} β_{i,x,:}. The train
side (Φ, Q) depends only on the training loss, so only the measured output changes per class: we
score every (x, c) pair with g = logit_c(x) (:class:`ClassLogitOutput`), one TRAK experiment per
target chunk holding its t·k pairs. τ[:, x, c] is thus TRAK's own estimate for logit c, not a
rescaled margin score.

Calibration. TRAK's overall scale is arbitrary, so for every (x, c) we fit by least squares on the
store's subset models y_j ≈ a·(S_j·τ[:, x, c]) + b, with y_j = logit_c(x) of subset model j, and
write β[:, x, c] = a·τ[:, x, c], β0[x, c] = b. The subset models are the blocks complete when the fit
starts (``calibration_blocks`` in the group's config, kept when the store grows later); the first H
are held out of the fit (:func:`attribution.lds.holdout_split`, as in `dmm fit`); ``trak/lds`` and
``trak/lds_margin`` are the LDS of the calibrated β on them. ``trak/lam`` stays NaN (TRAK has no λ).

Targets. ``run_trak(targets=SPEC)`` (:mod:`attribution.target_subset`) scores only a subset T of the points:
target gradients are computed for those points alone and ``trak/`` holds their |T| columns.

Measured on digits (mlp, 1024 subset models, H = 100, P = 179): mean margin LDS 0.45 / 0.49 / 0.51
with C = 4 / 8 / 16 checkpoints; 0.34 with C = 16, P = 512.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm
from trak import TRAKer
from trak.modelout_functions import ImageClassificationModelOutput

from . import lds as lds_mod
from .datasets import Dataset, check_fingerprint, load_dataset
from .engine import train_batched
from .errors import DmmError
from .fit_group import FitGroup, create_fit_group, refuse_other_settings
from .row_copy import write_row_copy
from .models import build_model, require_consent
from .recipes import Recipe
from .store import AttributionStore, StoreError
from .store_zarr import ARRAY_CONFIG, COMPRESSORS, array_attrs
from .target_subset import ALL, parse_targets

PREFIX = "trak"
CHECKPOINTS = "checkpoints"  # trak/checkpoints/<state-dict entry>: C × shape, the checkpoints every chunk uses
# traker 0.3.2's BasicProjector (CPU; CUDA without fast_jl) frees its matrix in finalize_features and rebuilds it only
# when the checkpoint id changes or P spans several of these blocks: with one checkpoint and P <= 100, scoring crashes
BASIC_BLOCK = 100


class ClassLogitOutput(ImageClassificationModelOutput):
    """TRAK model output: TRAK's margin on the train side, logit_c(x) on the target side.

    While ``measure_logit`` is False (featurizing S) this is TRAK's image-classification output
    f(z) = log p/(1 − p) with Q = 1 − p. While True (scoring), the label slot carries the class c and
    the output is logit_c(x), so the score estimates train points' effect on that logit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.measure_logit = False

    def get_output(self, model, weights, buffers, image, label):
        if not self.measure_logit:
            return ImageClassificationModelOutput.get_output(model, weights, buffers, image, label)
        logits = torch.func.functional_call(model, (weights, buffers), image.unsqueeze(0))
        return logits.gather(1, label.view(1, 1)).sum()


def default_proj_dim(n_train: int) -> int:
    """P = n/8 within [32, 2048]. TRAK here has no ridge term, so P near n makes ΦᵀΦ ill-conditioned:
    on digits (n = 1437, C = 4) the margin LDS was 0.43 at P = 128–192 and 0.03 at P = 1024."""
    return min(2048, max(32, n_train // 8))


@dataclass(frozen=True)
class TrakSettings:
    """How `dmm trak` estimates β; all but the chunking and batch size are recorded in ``trak/`` attrs."""

    checkpoints: int = 4
    proj_dim: int | None = None  # None: default_proj_dim(n_train)
    holdout_models: int = lds_mod.DEFAULT_HOLDOUT  # as `dmm fit`: both measured on the same first H subset models
    target_chunk: int = 256
    row_chunk: int = 256
    projector_seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("checkpoints", "proj_dim", "holdout_models", "target_chunk", "row_chunk", "batch_size"):
            value = getattr(self, name)
            if name == "proj_dim" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DmmError(f"TRAK setting {name} must be a positive int, got {value!r}; fix: pass a positive int")
        if self.checkpoints == 1 and self.proj_dim is not None and self.proj_dim <= BASIC_BLOCK:
            raise DmmError(f"TRAK with 1 checkpoint needs proj_dim > {BASIC_BLOCK}, got {self.proj_dim}: traker "
                           f"0.3.2's BasicProjector loses its projection matrix at P <= {BASIC_BLOCK}, its block size; "
                           f"fix: pass --proj-dim {BASIC_BLOCK + 1} or more, or --checkpoints 2 or more")

    def resolve(self, n_train: int) -> "TrakSettings":
        return self if self.proj_dim is not None else replace(self, proj_dim=default_proj_dim(n_train))

    def config(self) -> dict:
        out = asdict(self)
        del out["target_chunk"], out["row_chunk"], out["batch_size"]
        return {"method": "trak", "target_output": "logit_c", "calibration": "least squares a*tau+b per (x, c)", **out}


@dataclass
class TrakReport:
    """What `dmm trak` prints: chunks written now / already done, LDS of the calibrated scores."""

    settings: TrakSettings
    written: int
    skipped: int
    calibration_models: int
    lds: dict  # lds.report(...) of the calibrated scores' LDS on the held-out models
    targets: str = ALL  # the target spec of trak/
    fitted_targets: int = 0  # |T|: β's columns


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train_checkpoints(data: Dataset, model_name: str, recipe: Recipe, count: int, device: str) -> list[dict]:
    """θ^(1..C): state dicts of C models trained on all of S with seeds 0..C−1."""
    masks = np.ones((count, data.n_train), dtype=bool)
    result = train_batched(model_name, data, recipe, list(range(count)), masks, device=device)
    return [result.state_dict(b) for b in range(count)]


def make_traker(data: Dataset, model_name: str, settings: TrakSettings, save_dir: Path, device: str) -> TRAKer:
    """A TRAKer on the store's architecture: BasicProjector on CPU, CudaProjector on CUDA (when fast_jl loads)."""
    model = build_model(model_name, data.input_shape, data.num_classes, seed=0).to(device)
    return TRAKer(model=model, task=ClassLogitOutput(), train_set_size=data.n_train, save_dir=str(save_dir),
                  device=device, proj_dim=settings.proj_dim, projector_seed=settings.projector_seed,
                  use_half_precision=False, logging_level=logging.ERROR)


def featurize(traker: TRAKer, checkpoints: list[dict], data: Dataset, batch_size: int, device: str,
              progress: bool = False) -> None:
    """Φ (projected margin gradients of S) and Q per checkpoint, then (ΦᵀΦ)⁻¹ (TRAK's finalize_features)."""
    traker.task.measure_logit = False
    x, y = data.x_train.to(device), data.y_train.to(device)
    for model_id, state in enumerate(tqdm(checkpoints, desc="TRAK featurize", disable=not progress)):
        traker.load_checkpoint(state, model_id=model_id)
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            traker.featurize(batch=(xb, yb), num_samples=len(yb))
    with _quiet():
        traker.finalize_features()


def score_targets(traker: TRAKer, checkpoints: list[dict], inputs: torch.Tensor, num_classes: int,
                  exp_name: str, batch_size: int, device: str) -> np.ndarray:
    """τ[i, x, c] (n × t × k) for targets ``inputs`` (t points) and every class c, averaged over checkpoints."""
    t, k = len(inputs), num_classes
    pair_inputs = inputs.repeat_interleave(k, dim=0).to(device)  # pair (x, c) at row x·k + c
    pair_classes = torch.arange(k).repeat(t).to(device)
    traker.task.measure_logit = True
    try:
        for model_id, state in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name, state, model_id=model_id, num_targets=t * k)
            for xb, cb in zip(pair_inputs.split(batch_size), pair_classes.split(batch_size)):
                traker.score(batch=(xb, cb), num_samples=len(cb))
        with _quiet():
            scores = np.array(traker.finalize_scores(exp_name), dtype=np.float32)
    finally:
        traker.task.measure_logit = False
    _discard_experiment(traker, exp_name, len(checkpoints))
    return scores.reshape(-1, t, k)


def _quiet():
    """Silence traker's own per-call progress bars (they write to stderr); our bars keep their stream."""
    return contextlib.redirect_stderr(io.StringIO())


def _discard_experiment(traker: TRAKer, exp_name: str, num_checkpoints: int) -> None:
    """Delete an experiment's memmaps (target gradients, n × t·k scores) so disk use stays one chunk."""
    Path(traker.saver.experiments[exp_name]["scores_path"]).unlink(missing_ok=True)
    for model_id in range(num_checkpoints):
        traker.save_dir.joinpath(str(model_id), f"{exp_name}_grads.mmap").unlink(missing_ok=True)


def calibrate(scores: np.ndarray, masks: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y_j ≈ a·(S_j·τ) + b per (x, c) over models j: returns (β = a·τ (n, t, k), β0 = b (t, k)).

    scores τ (n, t, k); masks (m, n) and logits (m, t, k) of the calibration subset models. A τ whose
    prediction does not vary over the models gets a = 0 (β0 = mean output).
    """
    n, t, k = scores.shape
    z = (np.asarray(masks, dtype=np.float64) @ scores.reshape(n, t * k).astype(np.float64)).reshape(-1, t, k)
    y = np.asarray(logits, dtype=np.float64)
    zc, yc = z - z.mean(0), y - y.mean(0)
    var = (zc * zc).sum(0)
    slope = np.divide((zc * yc).sum(0), var, out=np.zeros_like(var), where=var > 0)
    intercept = y.mean(0) - slope * z.mean(0)
    return (scores * slope.astype(np.float32)).astype(np.float32), intercept.astype(np.float32)


def _checkpoints_node(group: FitGroup) -> zarr.Group | None:
    node = group.store.group[group.prefix].get(CHECKPOINTS)
    return node if isinstance(node, zarr.Group) and node.attrs.get("names") is not None else None


def stored_checkpoints(group: FitGroup) -> list[dict] | None:
    """The checkpoints θ^(1..C) kept in ``trak/checkpoints`` (None if none were kept)."""
    node = _checkpoints_node(group)
    if node is None:
        return None
    arrays = {name: np.asarray(node[name][...]) for name in node.attrs["names"]}
    return [{name: torch.from_numpy(np.array(a[c])) for name, a in arrays.items()} for c in range(node.attrs["count"])]


def keep_checkpoints(group: FitGroup, checkpoints: list[dict]) -> None:
    """Write θ^(1..C) under ``trak/checkpoints`` (one array per state-dict entry, C × shape); names last, as marker."""
    fingerprint = group.store.fingerprint
    node = group.store.group[group.prefix].create_group(CHECKPOINTS, overwrite=True)
    for name in checkpoints[0]:
        value = np.stack([state[name].detach().cpu().numpy() for state in checkpoints])
        node.create_array(name, shape=value.shape, chunks=value.shape, dtype=value.dtype, compressors=COMPRESSORS,
                          config=ARRAY_CONFIG, attributes=array_attrs(fingerprint, f"{name} of checkpoints 1..C"))[...] = value
    node.attrs.update({"count": len(checkpoints), "names": list(checkpoints[0])})


def checkpoints_for(group: FitGroup, data: Dataset, model_name: str, recipe: Recipe, count: int,
                    device: str) -> list[dict]:
    """θ^(1..C) of a TRAK fit: those its first chunks used, else trained now and kept before any chunk is scored."""
    kept = stored_checkpoints(group)
    if kept is not None:
        return kept
    if group.completed_chunks():
        raise StoreError(f"{group.prefix}/ in {group.store.url} has scored chunks but no kept checkpoints (written by "
                         "an older version); fix: pass --overwrite to start over")
    checkpoints = train_checkpoints(data, model_name, recipe, count, device)
    keep_checkpoints(group, checkpoints)
    return checkpoints


def calibration_blocks(store: AttributionStore, overwrite: bool) -> list[int]:
    """The subset-model blocks a TRAK fit calibrates on: those its first chunks used, else all completed ones."""
    config = store.fit_group(PREFIX).config if store.has_fit_group(PREFIX) and not overwrite else {}
    return config.get("calibration_blocks") or store.completed_blocks()


def run_trak(store: AttributionStore, settings: TrakSettings = TrakSettings(), overwrite: bool = False,
             progress: bool = False, trust_code: bool = False, targets: str = ALL) -> TrakReport:
    """Fill ``trak/`` chunk by chunk (done chunks are skipped) and return the LDS of the calibrated scores.

    ``targets`` is the target spec (``all``, ``random:T:SEED``, ``ids:FILE``); another than the group's is refused.

    A resumed fit uses the subset models and checkpoints of its first chunks, whatever the store holds now.
    A `module:callable` model named by the store is imported only with `trust_code`.
    """
    spec = store.spec
    require_consent(spec.model, f"store {store.url}", trust_code)
    fitted = parse_targets(targets, spec.n_points)
    settings = settings.resolve(spec.n_train)
    data = load_dataset(spec.dataset)
    check_fingerprint(data, spec.fingerprint, f"store {store.url}")
    blocks = calibration_blocks(store, overwrite)
    masks = store.read_masks(blocks)
    fit_rows, eval_rows = lds_mod.holdout_split(len(masks), settings.holdout_models)
    config = {**settings.config(), "calibration_blocks": blocks}
    if not overwrite:
        refuse_other_settings(store, PREFIX, {"target_chunk": settings.target_chunk, "row_chunk": settings.row_chunk,
                                              **config},
                              fix="rerun with the settings it was started with to resume, or pass --overwrite to "
                                  "start over", targets=fitted)
    group = create_fit_group(store, PREFIX, settings.target_chunk, settings.row_chunk, config, overwrite=overwrite,
                             targets=fitted)
    labels = data.all_labels().numpy()
    missing = group.missing_chunks()
    if missing:
        device = device_name()
        checkpoints = checkpoints_for(group, data, spec.model, Recipe.from_dict(spec.recipe), settings.checkpoints,
                                      device)
        inputs = data.all_inputs()
        with tempfile.TemporaryDirectory(prefix="dmm-trak-") as save_dir:
            traker = make_traker(data, spec.model, settings, Path(save_dir), device)
            featurize(traker, checkpoints, data, settings.batch_size, device, progress)
            for chunk in tqdm(missing, desc="TRAK target chunks", disable=not progress):
                points = group.chunk_points(chunk)
                scores = score_targets(traker, checkpoints, inputs[points], spec.num_classes, f"chunk{chunk}",
                                       settings.batch_size, device)
                logits = store.read_logits(blocks, targets=points)
                weight, bias = calibrate(scores, masks[fit_rows], logits[fit_rows])
                per_class, margin = lds_mod.measure(masks[eval_rows], weight, bias, logits[eval_rows], labels[points])
                group.write_chunk(chunk, weight, bias, lds=per_class, lds_margin=margin)
    write_row_copy(group)  # β row-major for requests; also adds it to a complete group written before it existed
    return TrakReport(settings=settings, written=len(missing), skipped=group.num_chunks - len(missing),
                      calibration_models=fit_rows.stop - fit_rows.start,
                      lds=lds_mod.report(group.lds[:], group.lds_margin[:], fitted.train_count(spec.n_train)),
                      targets=fitted.spec, fitted_targets=group.num_targets)
