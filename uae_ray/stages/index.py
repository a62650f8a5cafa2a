"""``uae-ray index``: encode corpus.parquet with a Ray Data actor pool, then build the sharded FAISS index.

Reads ``corpus.parquet`` and the encoder (``run:encoder`` or a model name); writes a new immutable version
``index/<version>/`` (shards, ids.parquet, passages.parquet, manifest.json, and the encoder's calibration.json when it
has one) atomically, then moves the pointer
``index/CURRENT`` to it and keeps the newest ``keep_versions`` versions (see :mod:`uae_ray.index.versions`). Skips the
work when the current version was built from the same corpus, encoder, factory, shard count and search parameters.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from uae_ray.calibration import CALIBRATION_FILE, load_calibration
from uae_ray.config import ActorPool, IndexConfig
from uae_ray.data.schema import CORPUS, INDEX
from uae_ray.index.build import MANIFEST, build_sharded_index, default_search_params, gpu_available
from uae_ray.index.source import corpus_fingerprint, encoder_fingerprint
from uae_ray.index.versions import CURRENT, IndexVersionError, current_version, publish
from uae_ray.models.registry import resolve_model
from uae_ray.runtime import RunDir, ensure_ray

log = logging.getLogger("uae_ray.index")


def encode_corpus(corpus: pa.Table, encoder: str, pool: ActorPool, run_dir: str | None = None,
                  backend: str = "torch") -> np.ndarray:
    """Encode the ``text`` column with an actor pool of :class:`~uae_ray.models.encoder.EncodeBatch` (``backend``
    torch) or :class:`~uae_ray.models.fast_encoder.BackendEncodeBatch` (onnx, openvino).

    Args:
        encoder: a model spec; ``run:<dir>`` is resolved against ``run_dir`` (a URI) on each actor's node.
        backend: the CPU runtime (see :data:`uae_ray.config.EncoderBackend`); CUDA actors use torch.

    Returns:
        float32 [n, d] unit vectors in the row order of ``corpus``.
    """
    import ray

    from uae_ray.models.encoder import EncodeBatch
    from uae_ray.models.fast_encoder import BackendEncodeBatch

    n = corpus.num_rows
    table = pa.table({"row": np.arange(n, dtype=np.int64), "text": corpus.column("text")})
    blocks = max(1, min(n // pool.batch_size, 4 * pool.max_size))
    fn, kwargs = (EncodeBatch, {}) if backend == "torch" else (BackendEncodeBatch, {"backend": backend})
    ds = ray.data.from_arrow(table, override_num_blocks=blocks).map_batches(
        fn,
        fn_constructor_kwargs={"encoder": encoder, "run_dir": run_dir, **kwargs},
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
    source = {
        "corpus_rows": corpus.num_rows,
        "corpus_sha1": corpus_fingerprint(corpus),
        "encoder_spec": cfg.encoder,
        "encoder_sha1": encoder_fingerprint(encoder_path),
    }
    if cfg.encoder_backend != "torch":  # absent for torch: indexes built before the setting existed stay current
        source["encoder_backend"] = cfg.encoder_backend
    return source


def _current_manifest(run_dir: RunDir) -> dict[str, Any] | None:
    """The manifest of the version ``index/CURRENT`` names; None when there is none (or only the old flat layout)."""
    if not run_dir.exists(f"{INDEX}/{CURRENT}"):
        return None
    try:
        version = current_version(run_dir, INDEX)
    except IndexVersionError as e:
        log.warning("index: %s; building a new version", e)
        return None
    return run_dir.read_json(f"{INDEX}/{version}/{MANIFEST}")


def _is_current(manifest: dict[str, Any] | None, cfg: IndexConfig, source: dict[str, Any]) -> bool:
    if manifest is None:
        return False
    return (
        manifest.get("source") == source
        and manifest.get("factory") == cfg.factory
        and manifest.get("num_shards") == cfg.num_shards
        and manifest.get("search_params") == default_search_params(cfg.factory, nprobe=cfg.nprobe,
                                                                     ef_search=cfg.ef_search)
    )


def _encoder_calibration(encoder_path: str) -> Path | None:
    """The encoder's utility calibration (checked to load), copied into each index version; None when it has none
    (a registry encoder, or a student trained before calibrations existed: hits then carry no expected utility)."""
    path = Path(encoder_path) / CALIBRATION_FILE
    if not path.is_file():
        log.info("index: %s has no %s: the index version carries no utility calibration", encoder_path,
                 CALIBRATION_FILE)
        return None
    load_calibration(path)  # a malformed file is an error naming it, before any work
    return path


def run(cfg: IndexConfig, run_dir: RunDir) -> dict[str, Any]:
    """Encode the corpus and build ``index/``; returns a summary (skipped when the index is current)."""
    corpus = run_dir.read_table(CORPUS, columns=["pid", "doc_id", "text", "n_tokens"])
    if corpus.num_rows == 0:
        raise ValueError(f"{run_dir.path(CORPUS)}: no passages to index")
    encoder_path = resolve_model(cfg.encoder, run_dir)
    source = _source(cfg, corpus, encoder_path)
    manifest = _current_manifest(run_dir)
    if manifest is not None and _is_current(manifest, cfg, source):
        log.info("index: version %s of %s is current (%d vectors), skipping", manifest.get("version"),
                 run_dir.path(INDEX), manifest["vectors"])
        return {"skipped": True, "version": manifest.get("version"), "vectors": manifest["vectors"],
                "num_shards": manifest["num_shards"]}
    if removed := run_dir.remove_stale_temps(INDEX):  # scratch dirs of a killed build (other writers' only)
        log.warning("index: removed %d temporary build dir(s) a killed run left in %s", removed, run_dir.path(INDEX))
    use_gpu = gpu_available() > 0 if cfg.use_gpu == "auto" else bool(cfg.use_gpu)
    ensure_ray()
    t0 = time.perf_counter()
    if cfg.encoder_backend != "torch":  # export once on this node; actors elsewhere export into their node's cache
        from uae_ray.models.fast_encoder import export_onnx

        export_onnx(encoder_path)
    # actors resolve cfg.encoder themselves
    vectors = encode_corpus(corpus, cfg.encoder, cfg.pool, run_dir.uri, backend=cfg.encoder_backend)
    encode_s = time.perf_counter() - t0
    log.info("index: encoded %d passages in %.1f s; building %s x %d", len(vectors), encode_s, cfg.factory,
             cfg.num_shards)
    params = default_search_params(cfg.factory, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
    calibration = _encoder_calibration(encoder_path)

    def build(out: Path, version: str) -> dict[str, Any]:
        if calibration is not None:  # part of the version: committed with it, fetched with it, pruned with it
            shutil.copyfile(calibration, out / CALIBRATION_FILE)
        return build_sharded_index(
            vectors,
            corpus.column("pid").to_pylist(),
            cfg.factory,
            cfg.num_shards,
            out,
            encoder=cfg.encoder,
            train_sample=cfg.train_sample,
            use_gpu=use_gpu,
            search_params=params,
            extra={"version": version, "source": source, "encode_seconds": round(encode_s, 3),
                   "calibration": CALIBRATION_FILE if calibration is not None else None},
            passages=corpus.select(["doc_id", "text", "n_tokens"]),
        )

    key = {"source": source, "factory": cfg.factory, "num_shards": cfg.num_shards, "search_params": params}
    version, manifest = publish(run_dir, INDEX, key, build, keep_versions=cfg.keep_versions)
    return {
        "skipped": False,
        "version": version,
        "vectors": manifest["vectors"],
        "dim": manifest["dim"],
        "factory": manifest["factory"],
        "num_shards": manifest["num_shards"],
        "encode_seconds": round(encode_s, 3),
        "build_seconds": manifest["build_seconds"],
        "built_on": manifest["built_on"],
        "index_dir": run_dir.path(f"{INDEX}/{version}"),
        "calibration": manifest.get("calibration"),
    }
