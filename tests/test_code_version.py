"""Which code computed a stage: the sources' fingerprint, the stages it does not match, and the sentence saying so."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cluster.code_version import (PACKAGES, UNRECORDED, code_fingerprint, other_code, provenance,
                                  source_fingerprint)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def walked_fingerprint(roots) -> str:
    """The definition, written out: every .py file by its path from its root's name, in path order."""
    entries = []
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                if name.endswith(".py"):
                    path = Path(folder) / name
                    entries.append((root.name + "/" + path.relative_to(root).as_posix(), path.read_bytes()))
    digest = hashlib.sha256()
    for rel, data in sorted(entries, key=lambda e: e[0]):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def test_the_fingerprint_follows_the_sources_and_nothing_else(tmp_path):
    pkg = write(tmp_path / "pkg", {"a.py": "x = 1\n", "sub/b.py": "y = 2\n", "notes.md": "text"})
    base = source_fingerprint([pkg])
    assert base == walked_fingerprint([pkg]) and len(base) == 64
    (pkg / "notes.md").write_text("other text")
    (pkg / "data.npy").write_bytes(b"\0")
    assert source_fingerprint([pkg]) == base  # not a source
    (pkg / "sub/b.py").write_text("y = 3\n")
    edited = source_fingerprint([pkg])
    assert edited != base
    (pkg / "sub/b.py").rename(pkg / "sub/c.py")
    assert source_fingerprint([pkg]) not in (base, edited)  # the same bytes under another name


def test_the_pipelines_fingerprint_covers_its_three_packages():
    top = Path(__file__).resolve().parents[1]
    assert code_fingerprint() == walked_fingerprint([top / p for p in PACKAGES])


def test_stages_of_other_or_unrecorded_code_are_named_and_counted():
    current = "c" * 64
    others = other_code({"originals": current, "oracles[x]": "a" * 64, "floor[x]": "a" * 64, "forget[x]": None},
                        current)
    assert others == {"oracles[x]": "a" * 64, "floor[x]": "a" * 64, "forget[x]": UNRECORDED}
    assert provenance(current, others, 4) == (
        "Code `cccccccccccc` (sha256 of the pipeline's sources) read this cache, but 3 of 4 stages were computed by "
        "other code (`aaaaaaaaaaaa`: 2, `unrecorded`: 1) and may differ from a fresh run's in float rounding; "
        "a fresh --out recomputes every stage with this code.")
    assert provenance(current, {}, 4) == "Code `cccccccccccc` (sha256 of the pipeline's sources) computed every stage."
