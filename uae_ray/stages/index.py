"""``uae-ray index``: encode corpus.parquet with a Ray Data actor pool, then build the sharded FAISS index.

Reads ``corpus.parquet`` and the encoder (``run:encoder`` or a model name); writes ``index/`` atomically
(shards, ids.parquet, manifest.json). Skips the work when ``index/`` is complete and was built from the same corpus,
encoder, factory and shard count.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from uae_ray.config import ActorPool, IndexConfig
from uae_ray.data.schema import CORPUS, INDEX
from uae_ray.index.build import MANIFEST, build_sharded_index, default_search_params, gpu_available
from uae_ray.index.source import corpus_fingerprint, encoder_fingerprint, resolve_encoder
from uae_ray.runtime import RunDir, ensure_ray

log = logging.getLogger("uae_ray.index")


def encode_corpus(corpus: pa.Table, encoder: str, pool: ActorPool, run_dir: str | None = None) -> np.ndarray:
    """Encode the ``text`` column with an actor pool of :class:`~uae_ray.models.encoder.EncodeBatch`.

    Args:
        encoder: a model spec; ``run:<dir>`` is resolved against ``run_dir`` (a URI) on each actor's node.

    Returns:
        float32 [n, d] unit vectors in the row order of ``corpus``.
    """
    import ray

    from uae_ray.models.encoder import EncodeBatch

    n = corpus.num_rows
    table = pa.table({"row": np.arange(n, dtype=np.int64), "text": corpus.column("text")})
    blocks = max(1, min(n // pool.batch_size, 4 * pool.max_size))
    ds = ray.data.from_arrow(table, override_num_blocks=blocks).map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"encoder": encoder, "run_dir": run_dir},
        **pool.map_batches_args(),
        batch_size=pool.batch_size,
    )
    rows: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    for batch in ds.select_columns(["row", "embedding"]).iter_batches(batch_format="numpy", batch_size=4096):
        rows.append(np.asarray(batch["row"]))
        emb = batch["embedding"]
        embs.append(np.stack(list(emb)) if emb.dtype == object else np.asarray(emb))
    order = np.concatenate(rows)
    vectors = np.concatenate(embs).astype(np.float32, copy=False)
    if len(order) != n or not np.array_equal(np.sort(order), np.arange(n)):
        raise RuntimeError(f"encoding returned {len(order)} rows for {n} passages")
    out = np.empty_like(vectors)
    out[order] = vectors
    return out


def _source(cfg: IndexConfig, corpus: pa.Table, encoder_path: str) -> dict[str, Any]:
    return {
        "corpus_rows": corpus.num_rows,
        "corpus_sha1": corpus_fingerprint(corpus),
        "encoder_spec": cfg.encoder,
        "encoder_sha1": encoder_fingerprint(encoder_path),
    }


def _is_current(run_dir: RunDir, cfg: IndexConfig, source: dict[str, Any]) -> bool:
    if not run_dir.dir_complete(INDEX):
        return False
    manifest = run_dir.read_json(f"{INDEX}/{MANIFEST}")
    return (
        manifest.get("source") == source
        and manifest.get("factory") == cfg.factory
        and manifest.get("num_shards") == cfg.num_shards
        and manifest.get("search_params") == default_search_params(cfg.factory, nprobe=cfg.nprobe,
                                                                     ef_search=cfg.ef_search)
    )


def run(cfg: IndexConfig, run_dir: RunDir) -> dict[str, Any]:
    """Encode the corpus and build ``index/``; returns a summary (skipped when the index is current)."""
    corpus = run_dir.read_table(CORPUS, columns=["pid", "text"])
    if corpus.num_rows == 0:
        raise ValueError(f"{run_dir.path(CORPUS)}: no passages to index")
    encoder_path = resolve_encoder(cfg.encoder, run_dir)
    source = _source(cfg, corpus, encoder_path)
    if _is_current(run_dir, cfg, source):
        manifest = run_dir.read_json(f"{INDEX}/{MANIFEST}")
        log.info("index: %s is current (%d vectors), skipping", run_dir.path(INDEX), manifest["vectors"])
        return {"skipped": True, "vectors": manifest["vectors"], "num_shards": manifest["num_shards"]}
    use_gpu = gpu_available() > 0 if cfg.use_gpu == "auto" else bool(cfg.use_gpu)
    ensure_ray()
    t0 = time.perf_counter()
    vectors = encode_corpus(corpus, cfg.encoder, cfg.pool, run_dir.uri)  # actors resolve cfg.encoder themselves
    encode_s = time.perf_counter() - t0
    log.info("index: encoded %d passages in %.1f s; building %s x %d", len(vectors), encode_s, cfg.factory,
             cfg.num_shards)
    with run_dir.staged_dir(INDEX) as out:
        manifest = build_sharded_index(
            vectors,
            corpus.column("pid").to_pylist(),
            cfg.factory,
            cfg.num_shards,
            out,
            encoder=cfg.encoder,
            train_sample=cfg.train_sample,
            use_gpu=use_gpu,
            search_params=default_search_params(cfg.factory, nprobe=cfg.nprobe, ef_search=cfg.ef_search),
            extra={"source": source, "encode_seconds": round(encode_s, 3)},
        )
    return {
        "skipped": False,
        "vectors": manifest["vectors"],
        "dim": manifest["dim"],
        "factory": manifest["factory"],
        "num_shards": manifest["num_shards"],
        "encode_seconds": round(encode_s, 3),
        "build_seconds": manifest["build_seconds"],
        "built_on": manifest["built_on"],
        "index_dir": run_dir.path(INDEX),
    }
