"""The targets a fit group fits: every point x (``all``) or a subset T of them (docs/scaling.md, "ImageNet scale").

Each target's regression β_{·,x,·} is independent of the others, so fitting β only for the targets the
evaluation and DMM's fine-tuning read divides the fit's compute and β's size by p / |T|. A subset group
(``datamodels/`` or ``trak/``) records its spec in the attr ``targets`` and the sorted point ids in the
int64 array ``target_ids``; its β has one column per fitted target, in that order. A group fitted with
``all`` has neither (today's layout, bit for bit).

SPEC: ``all``; ``random:T:SEED`` (T points drawn without replacement from the n_points, sorted;
the same for the same SEED); ``ids:FILE`` (one point index per line: train points 0..n_train-1,
then held-out points n_train..n_points-1).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DmmError

ALL = "all"
IDS = "target_ids"  # the group's array of fitted point ids (subset groups only)
FORMS = "all, random:T:SEED or ids:FILE"


class TargetSpecError(DmmError):
    """An unusable --targets spec; the message names the problem and the fix."""


@dataclass(frozen=True)
class Targets:
    """A fit's targets: ``spec`` as given and, for a subset, its sorted int64 point ``ids`` (None: every point)."""

    spec: str = ALL
    ids: np.ndarray | None = None

    @property
    def is_subset(self) -> bool:
        return self.ids is not None

    def count(self, n_points: int) -> int:
        """|T|: β's number of columns."""
        return n_points if self.ids is None else len(self.ids)

    def points(self, columns: slice) -> np.ndarray | slice:
        """The point ids of β's ``columns`` (the same slice when every point is fitted)."""
        return columns if self.ids is None else self.ids[columns]

    def train_count(self, n_train: int) -> int:
        """How many targets are train points (they come first: ids are sorted)."""
        return n_train if self.ids is None else int(np.searchsorted(self.ids, n_train))


def parse_targets(spec: str | None, n_points: int) -> Targets:
    """``spec`` (None: ``all``) checked against the store's n_points; a one-line TargetSpecError otherwise."""
    spec = ALL if spec is None else str(spec).strip()
    if spec == ALL:
        return Targets()
    kind, _, rest = spec.partition(":")
    if kind == "random":
        parts = rest.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise TargetSpecError(f"--targets {spec!r} is not random:T:SEED; fix: e.g. --targets random:2000:0")
        count, seed = int(parts[0]), int(parts[1])
        if not 1 <= count <= n_points:
            raise TargetSpecError(f"--targets {spec!r} asks for {count} targets of {n_points} points; "
                                  f"fix: pick T in 1..{n_points}")
        ids = np.sort(np.random.default_rng(seed).choice(n_points, size=count, replace=False)).astype(np.int64)
        return Targets(spec, ids)
    if kind == "ids" and rest:
        return Targets(spec, _read_ids(Path(rest), n_points, spec))
    raise TargetSpecError(f"--targets {spec!r} is not a target spec; fix: pass {FORMS}")


def _read_ids(path: Path, n_points: int, spec: str) -> np.ndarray:
    """Sorted point ids from a text file of one index per line, each in [0, n_points) once."""
    try:
        tokens = path.read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise TargetSpecError(f"--targets {spec!r}: cannot read {path} ({type(e).__name__}); "
                              "fix: give a text file of one point index per line") from None
    bad = next((t for t in tokens if not t.lstrip("-").isdigit()), None)
    if bad is not None or not tokens:
        what = f"{bad!r} is not an integer index" if bad is not None else "the file lists no index"
        raise TargetSpecError(f"--targets {spec!r}: {what}; fix: list one point index per line")
    ids = np.array([int(t) for t in tokens], dtype=np.int64)
    out = ids[(ids < 0) | (ids >= n_points)]
    if out.size:
        raise TargetSpecError(f"--targets {spec!r}: index {out[0]} is out of range; fix: list point indices "
                              f"0..{n_points - 1} (train points, then held-out points)")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise TargetSpecError(f"--targets {spec!r}: index {uniq[counts > 1][0]} is listed "
                              f"{counts[counts > 1][0]} times; fix: list each index once")
    return uniq


def group_targets(attrs: dict, read_ids) -> Targets:
    """The targets of a fit group with ``attrs``; ``read_ids()`` reads its ``target_ids`` (subset groups only)."""
    spec = attrs.get("targets", ALL)
    return Targets() if spec == ALL else Targets(spec, np.asarray(read_ids(), dtype=np.int64))
