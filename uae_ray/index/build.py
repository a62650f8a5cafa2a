"""Build a sharded FAISS index: train the quantizer once, clone it into every shard, add vectors with global ids.

Every shard is an inner-product index over unit vectors (cosine). The factory strings the project accepts are
``Flat``, ``IVF{n},Flat``, ``IVF{n},PQ{m}`` and ``HNSW{m}``; ``Flat`` and ``HNSW`` cannot take ids themselves, so they
are wrapped in ``IDMap``. Global id ``i`` is row ``i`` of the input; shard ``s`` holds a contiguous range of rows.

Files written into ``out_dir`` (the caller makes the directory atomic, e.g. with ``RunDir.staged_dir``)::

    shard-000.faiss ...  faiss.write_index files (no pickles)
    ids.parquet          id (int64), pid (string), shard (int32)
    passages.parquet     id, shard, pid, doc_id, text (and n_tokens) of every vector (when given): what a version
                         serves, so a later corpus.parquet never changes the text returned for an id of this version
    manifest.json        encoder, dim, factory, shards, vectors, build times, search params, mmap flag
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uae_ray.data.schema import INDEX_IDS_SCHEMA

log = logging.getLogger("uae_ray.index")

MANIFEST = "manifest.json"
IDS = "ids.parquet"
PASSAGES = "passages.parquet"
FORMAT_VERSION = 1
ADD_CHUNK = 65_536

_FACTORY = re.compile(r"^(?:Flat|IVF(?P<nlist>\d+),(?:Flat|PQ(?P<m>\d+)(?:x\d+)?)|HNSW(?P<hnsw>\d+)(?:,Flat)?)$")


class IndexBuildError(ValueError):
    """Inputs that cannot make the requested index; the message names the factory and the numbers."""


def shard_file(shard: int) -> str:
    """File name of shard ``shard`` inside the index directory."""
    return f"shard-{shard:03d}.faiss"


def faiss_factory(factory: str) -> str:
    """The faiss ``index_factory`` string for a project factory string (``IDMap,`` added where ids need it)."""
    if not _FACTORY.match(factory):
        raise IndexBuildError(
            f"unsupported factory {factory!r}: use Flat, IVF{{n}},Flat, IVF{{n}},PQ{{m}} or HNSW{{m}}"
        )
    return factory if factory.startswith("IVF") else f"IDMap,{factory}"


def default_search_params(factory: str, *, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, int]:
    """Search-time parameters stored in the manifest: ``nprobe`` for IVF, ``efSearch`` for HNSW, none for Flat."""
    m = _FACTORY.match(factory)
    if m is None:
        raise IndexBuildError(f"unsupported factory {factory!r}")
    if m.group("nlist"):
        nlist = int(m.group("nlist"))
        return {"nprobe": min(nlist, nprobe if nprobe is not None else max(1, min(nlist, 32)))}
    if m.group("hnsw"):
        return {"efSearch": ef_search if ef_search is not None else 64}
    return {}


def mmap_flag_name(factory: str) -> str:
    """The faiss read flag that memory-maps this index type (measured on faiss 1.15: RSS grows by ~1 MB, not the
    file size): ``IO_FLAG_MMAP`` for IVF (read-only on-disk inverted lists), ``IO_FLAG_MMAP_IFC`` for Flat and HNSW
    (the flat code storage is mapped; the HNSW graph itself is still read into memory)."""
    return "IO_FLAG_MMAP" if factory.startswith("IVF") else "IO_FLAG_MMAP_IFC"


def gpu_available() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _check_inputs(vectors: np.ndarray, ids: Sequence[str], factory: str, num_shards: int) -> None:
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise IndexBuildError(f"vectors must be a float32 [n, d] array, got {vectors.dtype} {vectors.shape}")
    n, d = vectors.shape
    if n == 0:
        raise IndexBuildError("no vectors to index")
    if len(ids) != n:
        raise IndexBuildError(f"{len(ids)} ids for {n} vectors")
    if len(set(ids)) != n:
        raise IndexBuildError("ids (pids) are not unique")
    if not 1 <= num_shards <= n:
        raise IndexBuildError(f"num_shards={num_shards} must be between 1 and the number of vectors ({n})")
    if not np.isfinite(vectors).all():
        bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise IndexBuildError(f"vector of row {bad} (pid {ids[bad]!r}) is not finite")
    norms = np.linalg.norm(vectors, axis=1)
    off = np.flatnonzero(np.abs(norms - 1.0) > 1e-3)
    if off.size:
        raise IndexBuildError(
            f"{off.size} vectors are not unit length (row {int(off[0])}, pid {ids[int(off[0])]!r}, "
            f"norm {norms[off[0]]:.4f}); inner product needs normalised vectors"
        )
    m = _FACTORY.match(factory)
    assert m is not None  # checked by faiss_factory before
    if m.group("m") and d % int(m.group("m")):
        raise IndexBuildError(f"{factory}: PQ{m.group('m')} needs the dimension ({d}) to be a multiple of it")
    if m.group("nlist") and int(m.group("nlist")) > n:
        raise IndexBuildError(f"{factory}: {m.group('nlist')} lists need at least as many vectors, got {n}")


def train_template(
    vectors: np.ndarray, factory: str, *, train_sample: int = 100_000, use_gpu: bool = False, seed: int = 0
) -> Any:
    """An empty, trained index for ``factory`` (trained once on a random sample; untrained types are returned as is).

    Args:
        vectors: float32 [n, d] unit vectors.
        factory: project factory string.
        train_sample: at most this many rows train the quantizer.
        use_gpu: train on all visible GPUs (faiss-gpu); HNSW always builds on CPU.
        seed: sample seed.
    """
    import faiss

    d = vectors.shape[1]
    index = faiss.index_factory(d, faiss_factory(factory), faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return index
    rng = np.random.default_rng(seed)
    n_train = min(train_sample, len(vectors))
    sample = vectors[np.sort(rng.choice(len(vectors), size=n_train, replace=False))]
    if use_gpu:
        gpu_index = faiss.index_cpu_to_all_gpus(index)
        gpu_index.train(sample)
        return faiss.index_gpu_to_cpu(gpu_index)
    index.train(sample)
    return index


def _add_shard(template: Any, vectors: np.ndarray, ids: np.ndarray, *, use_gpu: bool, desc: str) -> Any:
    import faiss
    from tqdm.auto import tqdm

    index = faiss.clone_index(template)
    target = faiss.index_cpu_to_all_gpus(index) if use_gpu else index
    for start in tqdm(range(0, len(vectors), ADD_CHUNK), desc=desc, unit="chunk", leave=False):
        target.add_with_ids(vectors[start : start + ADD_CHUNK], ids[start : start + ADD_CHUNK])
    return faiss.index_gpu_to_cpu(target) if use_gpu else index


def build_sharded_index(
    vectors: np.ndarray,
    ids: Sequence[str],
    factory: str,
    num_shards: int,
    out_dir: Path,
    *,
    encoder: str = "",
    train_sample: int = 100_000,
    use_gpu: bool = False,
    search_params: dict[str, int] | None = None,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    passages: pa.Table | None = None,
) -> dict[str, Any]:
    """Build ``num_shards`` shards of a ``factory`` index over ``vectors`` and write them to ``out_dir``.

    Args:
        vectors: float32 [n, d] unit vectors; row i gets global id i.
        ids: the n passage ids (pids), unique; stored in ids.parquet as (id, pid, shard).
        factory: ``Flat``, ``IVF{n},Flat``, ``IVF{n},PQ{m}`` or ``HNSW{m}``.
        num_shards: number of shards (contiguous row ranges).
        out_dir: existing directory to write into.
        encoder: what made the vectors (recorded in the manifest; the service checks it).
        train_sample: rows used to train the quantizer (once, then cloned into every shard).
        use_gpu: build on GPU (needs faiss-gpu and a GPU; HNSW stays on CPU).
        search_params: ``{"nprobe": n}`` / ``{"efSearch": n}``; defaults from :func:`default_search_params`.
        seed: training sample seed.
        extra: more JSON-able manifest fields (e.g. the source fingerprint, the version).
        passages: optional table with ``doc_id`` and ``text`` columns (and ``n_tokens``, kept when present), one
            row per vector in the order of ``vectors``; written to ``passages.parquet`` with the ids and shards.

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).
    """
    fstring = faiss_factory(factory)
    _check_inputs(vectors, ids, factory, num_shards)
    on_gpu = bool(use_gpu) and gpu_available() > 0 and not factory.startswith("HNSW")
    if use_gpu and not on_gpu:
        log.warning("use_gpu: %s", "HNSW builds on CPU" if factory.startswith("HNSW") else "no GPU visible to faiss")
    t0 = time.perf_counter()
    template = train_template(vectors, factory, train_sample=train_sample, use_gpu=on_gpu, seed=seed)
    train_s = time.perf_counter() - t0
    n = len(vectors)
    global_ids = np.arange(n, dtype=np.int64)
    ranges = np.array_split(global_ids, num_shards)
    shard_col = np.empty(n, dtype=np.int32)
    params = search_params if search_params is not None else default_search_params(factory)
    import faiss

    for s, rows in enumerate(ranges):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        index = _add_shard(template, vectors[lo:hi], global_ids[lo:hi], use_gpu=on_gpu, desc=f"shard {s}")
        faiss.write_index(index, str(out_dir / shard_file(s)))
        shard_col[lo:hi] = s
    table = pa.table(
        {"id": global_ids, "pid": pa.array(list(ids), pa.string()), "shard": shard_col}, schema=INDEX_IDS_SCHEMA
    )
    pq.write_table(table, out_dir / IDS)
    if passages is not None:
        if passages.num_rows != n:
            raise IndexBuildError(f"passages: {passages.num_rows} rows for {n} vectors")
        out = (table.append_column("doc_id", passages.column("doc_id").cast(pa.string()))
               .append_column("text", passages.column("text").cast(pa.string())))
        if "n_tokens" in passages.column_names:  # the corpus's passage lengths: what Serve's token budget counts
            out = out.append_column("n_tokens", passages.column("n_tokens").cast(pa.int32()))
        pq.write_table(out, out_dir / PASSAGES)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "encoder": encoder,
        "dim": int(vectors.shape[1]),
        "factory": factory,
        "faiss_factory": fstring,
        "metric": "inner_product",
        "num_shards": num_shards,
        "vectors": n,
        "shard_sizes": [len(r) for r in ranges],
        "search_params": params,
        "mmap_flag": mmap_flag_name(factory),
        "train_sample": min(train_sample, n) if factory.startswith("IVF") else 0,
        "train_seconds": round(train_s, 3),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "built_on": "gpu" if on_gpu else "cpu",
        "faiss_version": faiss.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "passages": passages is not None,
        **(extra or {}),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
