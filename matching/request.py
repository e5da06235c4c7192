"""A deletion request: validate, unlearn with a registered method, write the model, record it.

The request chain of a store is linear. Request 1 starts from θ0: the store keeps θ0's logits
(`original/logits`, written at request 1) and every later DM-Direct target is computed from them.
Request j > 1 must start from the model request j−1 wrote (checked by file hash) and forgets the
union of every id forgotten so far. To start over from θ0, use a copy of the store taken before
request 1.

Order, all under the store's lock (`store_lock`): every check and the method itself run first; then
the output model is staged beside `--out`, θ0's logits (request 1 only) and the ledger entry are
written, and the model is moved into place last (`commit.all_or_nothing`). A failure at any of these
writes puts back what was there: the store, the ledger and every model file stay byte-identical.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from attribution.checkpoint import file_sha256
from attribution.datasets import Dataset
from attribution.evaluation import model_logits
from attribution.store import AttributionStore

from .commit import all_or_nothing
from .errors import MatchingError
from .finetune import MatchingConfig
from .inputs import forget_set, load_store_model, store_dataset
from .ledger import LEDGER, LedgerEntry, append_entry, forgotten_ids, ids_sha256, read_ledger, store_lock
from .methods import UnlearnTask, check_model_for, get_method, unlearned_meta

DEFAULT_LOCK_TIMEOUT_S = 600.0
ORIGINAL_PREFIX = "original"          # θ0's logits (AttributionStore.write_original_logits)
LEDGER_PREFIX = LEDGER.split("/")[0]  # the ledger


@dataclass(frozen=True)
class RequestResult:
    """What a request did: `entry` is its ledger entry, None when every id was already forgotten."""
    entry: LedgerEntry | None
    new_ids: np.ndarray          # ids of this request not forgotten before
    forgotten_ids: np.ndarray    # every id forgotten so far
    message: str
    method_s: float = 0.0        # wall time inside the method (for DMM: DM-Direct targets + fine-tuning)
    stats: dict | None = None    # the method's report of its run (DMM: matching loss at start and end, steps)
    parts: dict | None = None    # wall seconds of the request's parts (`REQUEST_PARTS`)


# a request's parts, in order: opening the store, dataset and model; the chain checks under the lock
# (ledger, model hash, θ0's logits); the method before its fine-tuning (DMM: reading F's β rows for the
# DM-Direct targets); the fine-tuning; the writes (staged model, θ0's logits, ledger, rename)
REQUEST_PARTS = ("open", "checks", "targets", "finetune", "writes")


def _store_url(store: str | os.PathLike | AttributionStore) -> str:
    return store.url if isinstance(store, AttributionStore) else os.fspath(store)


def _original_logits(store: AttributionStore, entries: list[LedgerEntry], model_sha: str, model, data: Dataset):
    """(θ0's logits, whether they still need writing). Checks that `model` continues the chain."""
    kept = store.original_model_sha256()
    if entries:
        last = entries[-1]
        if model_sha != last.output_sha256:
            raise MatchingError(f"the model is not the latest of this store's request chain; pass the output of "
                                f"request {last.id}, {last.output_path} (sha256 {last.output_sha256[:12]})")
        return store.read_original_logits(entries[0].input_sha256), False
    if kept is not None and kept != model_sha:
        raise MatchingError(f"store {store.url} keeps the logits of θ0 with sha256 {kept[:12]}, not of this model "
                            f"({model_sha[:12]}); pass that θ0 as the first request's model")
    if kept is not None:
        return store.read_original_logits(model_sha), False
    return model_logits(model, data.all_inputs()).numpy(), True


def unlearn_request(store: str | os.PathLike | AttributionStore, model_path: str | os.PathLike, forget_ids,
                    method: str = "dmm", out: str | os.PathLike | None = None, attribution: str = "datamodels",
                    config: MatchingConfig = MatchingConfig(), oracles=(), data: Dataset | None = None,
                    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S, trust_code: bool = False,
                    device: str = "cpu") -> RequestResult:
    """Forget `forget_ids` (id file or ints) from the model at `model_path`, writing the result to `out`.

    `method` names a registered method ("dmm", "om", ...); `attribution` the fit group DMM's
    targets come from; `oracles` the model files OM matches; `trust_code` consents to a `module:callable`
    model named by the model files; `device` is where the model is fine-tuned. See the module docstring
    for the chain rule.
    """
    start = time.perf_counter()
    store = AttributionStore.open(_store_url(store), mode="r+")  # opening writes nothing
    data = store_dataset(store, data)
    ids = forget_set(forget_ids, store)
    unlearn = get_method(method)
    if out is None:
        raise MatchingError("no output path; pass --out for the unlearned model")
    model_path, out = Path(model_path), Path(out)
    if out.resolve() == model_path.resolve():
        raise MatchingError(f"--out {out} is the input model; write the unlearned model to a new file")
    model, meta = load_store_model(model_path, store, data, trust_code=trust_code, device=device)
    check_model_for(method, model, model_path)
    locked = time.perf_counter()
    with store_lock(store, lock_timeout) as still_held:
        entries = read_ledger(store)  # the ledger and θ0's logits are read afresh under the lock
        model_sha = file_sha256(model_path)
        original, first = _original_logits(store, entries, model_sha, model, data)
        before = forgotten_ids(entries)
        new_ids = np.setdiff1d(ids, before)
        if new_ids.size == 0:
            return RequestResult(None, new_ids, before, f"all {ids.size} ids are already forgotten; nothing changed")
        union = np.union1d(before, new_ids)
        task = UnlearnTask(model=model, data=data, forget_ids=union, store=store, original_logits=original,
                           attribution=attribution, config=config, oracles=tuple(map(str, oracles)),
                           trust_code=trust_code, model_path=str(model_path))
        method_start = time.perf_counter()
        unlearned = unlearn(task)
        method_s = time.perf_counter() - method_start
        finetune_s = unlearned.stats.get("seconds", 0.0)
        clock = {"open": locked - start, "checks": method_start - locked, "targets": method_s - finetune_s,
                 "finetune": finetune_s}
        request_id = len(entries) + 1
        out_meta = unlearned_meta(meta, {"store": store.url, "request": request_id, "method": method,
                                          "attribution": attribution, "n_forgotten": int(union.size)})
        written = [ORIGINAL_PREFIX, LEDGER_PREFIX] if first else [LEDGER_PREFIX]
        with all_or_nothing(store, written, out, unlearned.model.state_dict(), out_meta) as output_sha256:
            entry = LedgerEntry(
                id=request_id, time_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), method=method,
                attribution=attribution, n_ids=int(ids.size), ids_sha256=ids_sha256(ids), ids=ids.tolist(),
                n_forgotten=int(union.size), input_sha256=model_sha, output_sha256=output_sha256,
                output_path=str(out.resolve()), seed=config.seed, config=config.to_dict(),
                wall_s=round(time.perf_counter() - start, 4), stats=unlearned.stats)
            still_held()
            if first:
                store.write_original_logits(original, model_sha)
            append_entry(store, entry)
    clock["writes"] = time.perf_counter() - start - sum(clock.values())
    already = ids.size - new_ids.size
    message = (f"request {request_id}: {method} forgot {new_ids.size} new ids"
               + (f" ({already} already forgotten)" if already else "")
               + f", {union.size} in all, in {entry.wall_s:.2f} s" + _stats_text(unlearned.stats) + f" -> {out}")
    return RequestResult(entry, new_ids, union, message, method_s, unlearned.stats, clock)


def _stats_text(stats: dict) -> str:
    """`; matching loss 1.23 -> 0.0456 in 300 steps` for methods that report a matching loss (DMM: `, spread 1 on F`
    and the classes F holds whole as well), and a warning where it ended above its start (the steps moved the model
    away from its targets)."""
    if "loss_start" not in stats:
        return ""
    spread = f", spread {stats['spread']:g} on F" if "spread" in stats else ""
    if stats.get("whole_classes"):
        spread += f", class {', '.join(map(str, stats['whole_classes']))} whole: its measured shift"
    rose = (" — above its start: the fine-tuning moved away from its targets; lower --lr or raise --anneal-steps"
            if stats["loss_end"] > stats["loss_start"] else "")
    return (f"; matching loss {stats['loss_start']:.3g} -> {stats['loss_end']:.3g} in {stats['steps']} steps"
            f"{spread}{rose}")
