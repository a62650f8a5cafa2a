"""Where the vectors come from: fingerprint the encoder (resolved by :func:`uae_ray.models.registry.resolve_model`) and
the corpus.

The fingerprint lets ``uae-ray index`` skip a rebuild only when neither the corpus nor the encoder changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa


def encoder_fingerprint(path: str) -> str:
    """sha1 over (relative path, size, SHA-256) of the model files of a local directory; the path itself otherwise
    (a hub id or a name). By content: the same model copied to another machine or unpacked again is the same."""
    from uae_ray.storage import file_sha256

    p = Path(path)
    h = hashlib.sha1()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}:{f.stat().st_size}:{file_sha256(f)}\n".encode())
    else:
        h.update(path.encode())
    return h.hexdigest()


def corpus_fingerprint(table: pa.Table) -> str:
    """sha1 over the corpus pids and texts, in order."""
    h = hashlib.sha1()
    for pid, text in zip(table.column("pid").to_pylist(), table.column("text").to_pylist(), strict=True):
        h.update(f"{pid}\x00{text}\x01".encode())
    return h.hexdigest()
