"""Model files: a safetensors state dict plus a JSON sidecar (dataset fingerprint, model, recipe, seed).

Nothing is ever unpickled: `.safetensors` files are read with safetensors, `.pt` files with
`torch.load(weights_only=True)`; a sidecar naming a `module:callable` model is resolved only with
`trust_code=True` (see attribution/models.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .datasets import Dataset
from .models import build_model, require_consent
from .recipes import Recipe
from .sisa import SisaEnsemble
from .errors import DmmError


class CheckpointError(DmmError):
    """An unreadable or mismatched model file; the message names the fix."""


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_model(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Write the state dict (safetensors unless the name ends in .pt) and its sidecar, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix == ".pt":
        _atomic_write(path, lambda p: torch.save(state, p))
    else:
        _atomic_write(path, lambda p: save_file(state, str(p)))
    _atomic_write(sidecar_path(path), lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))


def model_meta(data: Dataset, model_name: str, recipe: Recipe, seed: int | None, **extra) -> dict:
    return {"dataset": data.name, "fingerprint": data.fingerprint, "model": model_name,
            "num_classes": data.num_classes, "recipe": recipe.to_dict(), "seed": seed, **extra}


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a state dict and its sidecar; any failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist; give the path written by `dmm train`")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu") if path.suffix == ".pt" else load_file(str(path))
    except Exception as e:  # noqa: BLE001 - every reader failure means the file is unusable
        raise CheckpointError(f"cannot read model file {path} ({type(e).__name__}); give a safetensors "
                              "or weights-only torch state dict") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
    try:
        meta = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{sidecar_path(path)} is missing or not JSON; keep the sidecar written "
                              "beside the model file") from None
    return state, meta


def load_model(path: str | Path, data: Dataset | None = None, trust_code: bool = False,
               device: str | torch.device = "cpu"):
    """Rebuild the model named in the sidecar on `device` and load its weights; check the dataset fingerprint.

    The sidecar is untrusted: a `module:callable` model is imported only with `trust_code=True`, and a
    dataset it names is loaded from disk, never downloaded.
    """
    state, meta = load_state(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("dataset"), str) or not isinstance(meta.get("model"), str):
        raise CheckpointError(f"{sidecar_path(path)} lacks the dataset and model names; keep the sidecar "
                              "written by `dmm train`")
    require_consent(meta["model"], f"model sidecar {sidecar_path(path)}", trust_code)
    from .datasets import check_fingerprint, load_dataset
    data = data or load_dataset(meta["dataset"])
    check_fingerprint(data, meta.get("fingerprint"), f"model {path}")  # also when data came from the sidecar's name
    model = build_model(meta["model"], data.input_shape, data.num_classes, seed=0)
    if "sisa" in meta:  # an ensemble of shard models with their slice checkpoints (`dmm train --sisa`)
        model = SisaEnsemble.like(model, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not fit model {meta['model']!r} ({first}); "
                              "give a model of the store's architecture") from None
    return model.to(device).eval(), meta
