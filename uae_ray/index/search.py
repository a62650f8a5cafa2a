"""Load a sharded index, search every shard and merge the per-shard top k exactly.

The merge keeps the k largest inner products (``keep_max``: a min-heap over scores, unlike FAISS's default L2
max-heap) and breaks ties the way one unsharded ``IndexFlatIP`` does (the larger id wins), so searching S Flat shards
returns exactly what one Flat index over all vectors returns (tested in ``tests/test_index.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from uae_ray.index.build import IDS, MANIFEST, shard_file
from uae_ray.index.versions import resolve_local

MISSING_SCORE = np.float32(-np.inf)


class IndexLoadError(ValueError):
    """An index directory that is missing files or is inconsistent; the message names the file."""


def read_manifest(index_dir: Path) -> dict[str, Any]:
    """The manifest of ``index_dir``; errors name the file."""
    path = resolve_local(Path(index_dir)) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise IndexLoadError(f"{path}: not found (run `uae-ray index` first)") from e
    except json.JSONDecodeError as e:
        raise IndexLoadError(f"{path}: not valid JSON ({e})") from e
    for key in ("dim", "factory", "num_shards", "vectors"):
        if key not in manifest:
            raise IndexLoadError(f"{path}: field {key!r} missing")
    return manifest


def apply_search_params(index: Any, params: dict[str, int]) -> None:
    """Set ``nprobe`` / ``efSearch`` on a loaded shard (through IDMap wrappers)."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, int(value))


def load_shard(index_dir: Path, shard: int, *, mmap: bool = True, manifest: dict[str, Any] | None = None) -> Any:
    """Read shard ``shard`` of ``index_dir`` with the manifest's search parameters applied.

    Args:
        index_dir: the index directory.
        shard: shard number.
        mmap: memory-map the shard's vectors (IVF lists with ``IO_FLAG_MMAP``; Flat/HNSW codes with
            ``IO_FLAG_MMAP_IFC``) so replicas on one node share the page cache instead of each holding a copy.
        manifest: the manifest, if already read.
    """
    import faiss

    index_dir = resolve_local(Path(index_dir))
    manifest = manifest or read_manifest(index_dir)
    path = index_dir / shard_file(shard)
    if not path.exists():
        raise IndexLoadError(f"{path}: shard file missing ({manifest['num_shards']} shards in the manifest)")
    flags = 0
    if mmap:
        flags = getattr(faiss, manifest.get("mmap_flag", "IO_FLAG_MMAP_IFC")) | faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise IndexLoadError(f"{path}: faiss could not read it ({str(e).splitlines()[0]})") from e
    if index.d != manifest["dim"]:
        raise IndexLoadError(f"{path}: dimension {index.d} != manifest dim {manifest['dim']}")
    apply_search_params(index, manifest.get("search_params", {}))
    return index


def read_pids(index_dir: Path, manifest: dict[str, Any]) -> np.ndarray:
    """Array of pids indexed by global id (ids are 0..n-1 by construction; checked)."""
    path = resolve_local(Path(index_dir)) / IDS
    if not path.exists():
        raise IndexLoadError(f"{path}: not found")
    table = pq.read_table(path, columns=["id", "pid"]).sort_by("id")
    ids = table.column("id").to_numpy()
    if len(ids) != manifest["vectors"] or not np.array_equal(ids, np.arange(len(ids))):
        raise IndexLoadError(f"{path}: ids must be 0..{manifest['vectors'] - 1} (got {len(ids)} rows)")
    return np.asarray(table.column("pid").to_pylist(), dtype=object)


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results into the global top ``k`` by inner product (largest first).

    Args:
        scores: per shard, float32 [n, k_s] (any order; id -1 marks a missing hit).
        ids: per shard, int64 [n, k_s] global ids.
        k: hits to keep.

    Returns:
        (scores [n, k] float32, ids [n, k] int64), sorted by score descending, exact ties ordered as
        ``IndexFlatIP`` orders them; missing hits are id -1 with score -inf.
    """
    if not scores:
        raise ValueError("merge_topk needs at least one shard result")
    d_all = np.concatenate([np.asarray(s, dtype=np.float32) for s in scores], axis=1)
    i_all = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids], axis=1)
    d_all = np.where(i_all < 0, MISSING_SCORE, d_all)
    # Ties as IndexFlatIP resolves them: its scan keeps the first (smallest) ids of a tied group that k cuts, and its
    # heap then lists tied hits larger id first. So: select by (score desc, id asc), then order by (score, id) desc.
    # (np.lexsort: the last key is the primary one.)
    order = np.lexsort((i_all, -d_all), axis=1)[:, :k]
    d_top = np.take_along_axis(d_all, order, axis=1)
    i_top = np.take_along_axis(i_all, order, axis=1)
    order = np.lexsort((-i_top, -d_top), axis=1)
    d_top = np.take_along_axis(d_top, order, axis=1)
    i_top = np.take_along_axis(i_top, order, axis=1)
    i_top = np.where(np.isneginf(d_top), -1, i_top)
    if d_top.shape[1] < k:  # fewer candidates than k in total
        pad = k - d_top.shape[1]
        d_top = np.pad(d_top, ((0, 0), (0, pad)), constant_values=MISSING_SCORE)
        i_top = np.pad(i_top, ((0, 0), (0, pad)), constant_values=-1)
    return d_top, i_top


def check_queries(query_vectors: np.ndarray, dim: int) -> np.ndarray:
    """Query vectors as a contiguous float32 [n, dim] array; a clear error otherwise."""
    q = np.asarray(query_vectors)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"query vectors must have shape [n, {dim}], got {list(q.shape)}")
    if not np.isfinite(q).all():
        raise ValueError("query vectors contain NaN or inf")
    return np.ascontiguousarray(q, dtype=np.float32)


@dataclass
class ShardedIndex:
    """All shards of one index directory, searched in-process and merged exactly.

    Attributes:
        manifest: the manifest dict (``encoder``, ``dim``, ``factory``, ``num_shards``, ``vectors``, ...).
        shards: the loaded FAISS shards.
        pids: pid per global id.
    """

    manifest: dict[str, Any]
    shards: list[Any]
    pids: np.ndarray
    index_dir: Path = field(default_factory=Path)

    @classmethod
    def load(cls, index_dir: Path, *, mmap: bool = True) -> ShardedIndex:
        """Load every shard of ``index_dir`` (memory-mapped by default) and the id -> pid table.

        ``index_dir`` is a version directory, or an index directory whose ``CURRENT`` pointer names the version
        (read once: every file comes from that one version), or an index of the old flat layout."""
        index_dir = resolve_local(Path(index_dir))
        manifest = read_manifest(index_dir)
        shards = [load_shard(index_dir, s, mmap=mmap, manifest=manifest) for s in range(manifest["num_shards"])]
        total = sum(int(s.ntotal) for s in shards)
        if total != manifest["vectors"]:
            raise IndexLoadError(f"{index_dir}: shards hold {total} vectors, manifest says {manifest['vectors']}")
        return cls(manifest=manifest, shards=shards, pids=read_pids(index_dir, manifest), index_dir=index_dir)

    @property
    def version(self) -> str:
        """The index version (its directory name; "" for the old flat layout)."""
        return str(self.manifest.get("version", ""))

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def ntotal(self) -> int:
        return int(self.manifest["vectors"])

    def search_ids(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global top ``k``: (scores [n, k] float32, ids [n, k] int64; -1 / -inf where fewer than k hits)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = check_queries(query_vectors, self.dim)
        parts = [shard.search(q, min(k, int(shard.ntotal))) for shard in self.shards]
        return merge_topk([p[0] for p in parts], [p[1] for p in parts], k)

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top ``k`` passages per query.

        Args:
            query_vectors: float32 [n, d] unit vectors (same encoder as the manifest's).
            k: hits per query.

        Returns:
            (scores [n, k] float32, pids: n lists of up to k pids). A row has fewer than k pids only when the index
            holds fewer than k vectors or an IVF search probed too few lists; its trailing scores are -inf.
        """
        scores, ids = self.search_ids(query_vectors, k)
        pids = [[str(self.pids[i]) for i in row if i >= 0] for row in ids]
        return scores, pids
