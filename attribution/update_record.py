"""Training-time update records (Graves et al. 2021, "Amnesiac Machine Learning"): while one model trains
(`engine.train_model(..., recorder=UpdateRecorder(...))`), the update Δθ_t = θ_{t+1} − θ_t of every
optimiser step t and the training ids its minibatch held. Amnesiac unlearning subtracts the updates of
the batches that held an id of F (`matching.baselines.amnesiac`).

A record lives beside its model file, in the folder `<model>.updates/` (format 1):

- `manifest.json`: format, keep, steps, per parameter its shape, dtype and kept entries k, the shards,
  and `params_sha256` of θ_T (the model it was recorded with);
- `shard-NNNNN.safetensors`, consecutive steps: `ids` (their batches' ids, concatenated) and `sizes`
  (one batch size per step), both int64, and per parameter p either `p` (steps, *shape), the dense
  Δ (keep = 1), or `p.index` (steps, k) int32 flat indices and `p.value` (steps, k) of the
  k = ⌈keep·numel⌉ entries of largest |Δ| (the layer-wise partial variant, Gogineni & Nadimi 2024).

The model's sidecar names it: `{"update_record": {"path": "<model name>.updates", "format": 1, "keep",
"steps", "bytes"}}` (the path relative to the model file's folder; bytes: the record's files, manifest
included). Parameters only: buffers (BatchNorm statistics) are not recorded, as in Graves et al.'s code.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import sidecar_path
from .errors import DmmError

RECORD_FORMAT = 1
SHARD_BYTES = 64 << 20  # a shard is written once the buffered updates reach this size
MANIFEST = "manifest.json"


class UpdateRecordError(DmmError):
    """A missing, mismatched or unreadable update record, or a bad keep fraction; the message names the fix."""


def record_dir(model_path: str | Path) -> Path:
    """The record folder of a model file: `<model>.updates/` beside it."""
    return Path(str(model_path) + ".updates")


def check_keep(keep: float) -> float:
    if not 0 < keep <= 1:
        raise UpdateRecordError(f"--record-keep {keep} must lie in (0, 1]; e.g. 0.1 keeps the top 10% of each "
                                "update per parameter tensor, 1 keeps all")
    return float(keep)


def parameters_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 of named parameters (names, dtypes, shapes and values): which θ a record belongs to."""
    h = hashlib.sha256()
    for name, p in named:
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class UpdateRecorder:
    """Records Δθ_t and batch t's ids while `engine.train_model` trains (`start`, then `step` after every
    optimiser step), streaming shards into `<model>.updates.tmp/`; `finish` moves the record into place
    and returns the sidecar entry. It only reads the parameters: the training is unchanged, bit for bit."""

    def __init__(self, model_path: str | Path, keep: float = 1.0, shard_bytes: int = SHARD_BYTES):
        self.keep = check_keep(keep)
        self.final = record_dir(model_path)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.shard_bytes = shard_bytes

    def start(self, model: nn.Module) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.prev = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.kept = {n: p.numel() if self.keep == 1 else math.ceil(self.keep * p.numel()) for n, p in self.prev.items()}
        self.pending: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self.pending_bytes, self.steps, self.shards = 0, 0, []

    @torch.no_grad()
    def step(self, ids: torch.Tensor, model: nn.Module) -> None:
        """Record the step just taken on the batch `ids`: Δ = θ_now − θ_before (top-k by |Δ| when keep < 1)."""
        update = {}
        for name, p in model.named_parameters():
            delta = p.detach() - self.prev[name]
            self.prev[name].copy_(p.detach())
            if self.keep == 1:
                update[name] = delta.cpu()
            else:
                index = delta.flatten().abs().topk(self.kept[name]).indices
                update[f"{name}.index"] = index.to(torch.int32).cpu()
                update[f"{name}.value"] = delta.flatten()[index].cpu()
        self.pending.append((ids.detach().cpu().to(torch.int64), update))
        self.pending_bytes += sum(t.numel() * t.element_size() for t in update.values())
        self.steps += 1
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        ids, updates = zip(*self.pending)
        tensors = {"ids": torch.cat(ids), "sizes": torch.tensor([len(i) for i in ids], dtype=torch.int64),
                   **{k: torch.stack([u[k] for u in updates]) for k in updates[0]}}
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(tensors, str(self.tmp / name))
        self.shards.append({"file": name, "steps": len(ids)})
        self.pending, self.pending_bytes = [], 0

    def finish(self) -> dict:
        """Write the last shard and the manifest, move the record to `<model>.updates/` (replacing an older
        one) and return the sidecar's `update_record` entry."""
        self._flush()
        params = {n: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "kept": self.kept[n]}
                  for n, p in self.prev.items()}
        manifest = {"format": RECORD_FORMAT, "keep": self.keep, "steps": self.steps, "params": params,
                    "shards": self.shards, "params_sha256": parameters_sha256(self.prev.items())}  # θ_T's
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        nbytes = sum(f.stat().st_size for f in self.tmp.iterdir())
        shutil.rmtree(self.final, ignore_errors=True)
        self.tmp.rename(self.final)
        self.dense_bytes = self.steps * sum(p.numel() * p.element_size() for p in self.prev.values())
        self.entry = {"path": self.final.name, "format": RECORD_FORMAT, "keep": self.keep, "steps": self.steps,
                      "bytes": nbytes}
        return self.entry

    def summary(self) -> str:
        """One line on the finished record: steps, keep, its bytes against the dense updates' bytes."""
        return (f"update record: {self.steps} steps, keep {self.keep:g}, {self.entry['bytes']:,} bytes "
                f"(dense updates: {self.dense_bytes:,} bytes) -> {self.final}")


class UpdateRecord:
    """A model's update record, read back (`of_model`); `forget_update` is amnesiac's Σ_{t∈B_F} Δθ_t."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory, self.manifest = directory, manifest

    @classmethod
    def of_model(cls, model_path: str | Path) -> "UpdateRecord":
        """The record the sidecar of `model_path` names; a one-line error when there is none."""
        try:
            entry = json.loads(sidecar_path(model_path).read_text()).get("update_record")
        except (OSError, ValueError, AttributeError):
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UpdateRecordError(f"model {model_path} has no update record; train it with "
                                    "`dmm train --record-updates` (amnesiac subtracts the recorded updates)")
        if entry.get("format") != RECORD_FORMAT:
            raise UpdateRecordError(f"the update record of {model_path} has format {entry.get('format')!r}, not "
                                    f"{RECORD_FORMAT}; retrain the model with `dmm train --record-updates`")
        directory = Path(model_path).parent / entry["path"]
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            raise UpdateRecordError(f"update record {directory} is missing or unreadable; keep it beside the model "
                                    "file, or retrain with `dmm train --record-updates`") from None
        return cls(directory, manifest)

    @property
    def steps(self) -> int:
        return int(self.manifest["steps"])

    def check_model(self, model: nn.Module, model_path: str | Path) -> None:
        """The record must be of this very θ_T (not, say, of the model an earlier request started from)."""
        if parameters_sha256(model.named_parameters()) != self.manifest["params_sha256"]:
            raise UpdateRecordError(f"{model_path} is not the model its update record {self.directory} was "
                                    "recorded with; pass the model `dmm train --record-updates` wrote")

    def forget_update(self, forget_ids) -> tuple[dict[str, torch.Tensor], int]:
        """(Σ_{t∈B_F} Δθ_t per parameter in float64 — sparse updates scattered into zeros —, |B_F|), B_F the
        steps whose batch held an id of F."""
        forget = np.asarray(forget_ids, dtype=np.int64)
        params = self.manifest["params"]
        total = {n: torch.zeros(math.prod(p["shape"]), dtype=torch.float64) for n, p in params.items()}
        removed = 0
        for shard in self.manifest["shards"]:
            tensors = load_file(str(self.directory / shard["file"]))
            batches = tensors["ids"].split(tensors["sizes"].tolist())
            hit = torch.tensor([bool(np.isin(b.numpy(), forget).any()) for b in batches])
            removed += int(hit.sum())
            if not hit.any():
                continue
            for name in params:
                if name in tensors:  # dense (steps, *shape)
                    total[name] += tensors[name][hit].flatten(1).sum(0, dtype=torch.float64)
                else:  # sparse: (steps, k) flat indices and values
                    index, value = tensors[f"{name}.index"][hit], tensors[f"{name}.value"][hit]
                    total[name].index_add_(0, index.flatten().long(), value.flatten().double())
        return {n: t.view(params[n]["shape"]) for n, t in total.items()}, removed
