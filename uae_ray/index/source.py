"""Where the vectors come from: resolve an encoder spec (``run:<dir>`` or a registry name/path) and fingerprint it.

The fingerprint lets ``uae-ray index`` skip a rebuild only when neither the corpus nor the encoder changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa

from uae_ray.models.registry import resolve
from uae_ray.runtime import RunDir

RUN_PREFIX = "run:"


def resolve_encoder(spec: str, run_dir: RunDir | None) -> str:
    """A loadable encoder location for ``spec``.

    Args:
        spec: ``run:<name>`` (a complete model directory in the run dir, e.g. ``run:encoder``) or anything
            :func:`uae_ray.models.registry.resolve` accepts (registry name, local path, hub id).
        run_dir: the run directory (needed for ``run:`` specs).

    Returns:
        A local directory (``run:`` specs, registry names) or a hub id.
    """
    if spec.startswith(RUN_PREFIX):
        name = spec[len(RUN_PREFIX) :]
        if run_dir is None:
            raise ValueError(f"encoder {spec!r} names a run-dir model but no run directory was given")
        if not run_dir.dir_complete(name):
            raise FileNotFoundError(
                f"encoder {spec!r}: {run_dir.path(name)} is missing or incomplete (run train-encoder first, "
                f"or set encoder to a model name such as all-minilm-l6-v2)"
            )
        return str(run_dir.fetch_dir(name))
    return resolve(spec).path


def resolve_on_worker(spec: str, run_dir_uri: str | None) -> str:
    """:func:`resolve_encoder` on a Ray worker holding only the run dir URI (`run:<dir>` fetched on its node)."""
    return resolve_encoder(spec, RunDir(run_dir_uri) if run_dir_uri else None)


def encoder_fingerprint(path: str) -> str:
    """sha1 over (relative path, size, mtime) of the model files of a local directory; the path itself otherwise."""
    p = Path(path)
    h = hashlib.sha1()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(p).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        h.update(path.encode())
    return h.hexdigest()


def corpus_fingerprint(table: pa.Table) -> str:
    """sha1 over the corpus pids and texts, in order."""
    h = hashlib.sha1()
    for pid, text in zip(table.column("pid").to_pylist(), table.column("text").to_pylist(), strict=True):
        h.update(f"{pid}\x00{text}\x01".encode())
    return h.hexdigest()
