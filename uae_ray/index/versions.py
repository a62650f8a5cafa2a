"""Immutable index versions and the pointer that names the current one.

Layout of the index directory in a run dir (``index/`` by default)::

    index/CURRENT                      {"version": "<version>", "published_at": ..., "vectors": ..., ...}
    index/<version>/                   shard-XXX.faiss, ids.parquet, passages.parquet, manifest.json, _SUCCESS
    index/<older version>/ ...         kept (the newest ``keep_versions``; the pointed-to one is never deleted)

A version is written once through ``RunDir.staged_dir`` (complete or absent, never half) and never changed; only
``CURRENT`` moves (one atomic ``RunDir.write_json``). A version name is ``<UTC time to the microsecond>Z-<sha1 of what
it was built from, 10 hex>``, e.g. ``20261201T031502123456Z-3f9a0c1d2e``: names sort by build time, and the hash tells
two builds of the same time apart. Global ids (the FAISS ids) are unique only within one version, so everything that
serves or searches an index pins one version and reads only its directory.

Reading "the index" (``ShardedIndex.load(run_dir/index)``, evaluate, ``uae-ray serve``) follows ``CURRENT``. An index
directory of the old flat layout (``manifest.json`` directly in ``index/``) is still read where no ``CURRENT`` exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from uae_ray.runtime import SUCCESS_MARKER, RunDir

log = logging.getLogger("uae_ray.index")

CURRENT = "CURRENT"
_VERSION = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{10}$")
# what an index of the old flat layout left in index/ itself (files; on object stores, its committed v-<id>/ dirs)
_LEGACY_FILES = re.compile(r"^(?:manifest\.json|ids\.parquet|passages\.parquet|shard-\d+\.faiss|v-[^/]+)$")


class IndexVersionError(FileNotFoundError):
    """No usable index version (missing pointer, missing or incomplete version directory); the message names it."""


def is_version_name(name: str) -> bool:
    """True for a version directory name made by :func:`new_version`."""
    return bool(_VERSION.match(name))


def new_version(key: Mapping[str, Any], now: float | None = None) -> str:
    """A fresh version name: UTC build time to the microsecond, then a hash of ``key`` (what the index is built from).
    """
    us = int((time.time() if now is None else now) * 1_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(us // 1_000_000)) + f"{us % 1_000_000:06d}Z"
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{stamp}-{digest}"


def read_pointer(run_dir: RunDir, index: str = "index") -> dict[str, Any]:
    """The ``CURRENT`` pointer of ``index``; errors name the file."""
    path = f"{index}/{CURRENT}"
    if not run_dir.exists(path):
        raise IndexVersionError(f"{run_dir.path(path)}: not found (run `uae-ray index` first)")
    try:
        pointer = run_dir.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexVersionError(f"{run_dir.path(path)}: not valid JSON ({e})") from e
    if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
        raise IndexVersionError(f"{run_dir.path(path)}: field 'version' (a string) missing")
    return pointer


def current_version(run_dir: RunDir, index: str = "index") -> str:
    """The version ``CURRENT`` points to, checked to be a complete version directory."""
    version = read_pointer(run_dir, index)["version"]
    check_version(run_dir, index, version)
    return version


def check_version(run_dir: RunDir, index: str, version: str) -> None:
    """Raise :class:`IndexVersionError` unless ``index/<version>`` is a complete version directory."""
    if not is_version_name(version):
        raise IndexVersionError(f"{run_dir.path(index)}: {version!r} is not an index version name")
    if not run_dir.dir_complete(f"{index}/{version}"):
        raise IndexVersionError(f"{run_dir.path(f'{index}/{version}')}: missing or incomplete index version "
                                f"(versions here: {list_versions(run_dir, index) or 'none'})")


def list_versions(run_dir: RunDir, index: str = "index") -> list[str]:
    """Complete version directories of ``index``, oldest first (names sort by build time)."""
    return [n for n in run_dir.listdir(index) if is_version_name(n) and run_dir.dir_complete(f"{index}/{n}")]


def has_index(run_dir: RunDir, index: str = "index") -> bool:
    """True when ``index`` has a current version (or is a complete index of the old flat layout)."""
    if run_dir.exists(f"{index}/{CURRENT}"):
        try:
            current_version(run_dir, index)
        except IndexVersionError:
            return False
        return True
    return run_dir.dir_complete(index) and run_dir.exists(f"{index}/manifest.json")


def fetch_index(run_dir: RunDir, index: str = "index", version: str | None = None) -> tuple[str, Path]:
    """(version, local directory) of ``version`` (default: the current one); old flat layout: ("", the dir)."""
    if version is None and not run_dir.exists(f"{index}/{CURRENT}") and run_dir.dir_complete(index):
        return "", run_dir.fetch_dir(index)
    version = version or current_version(run_dir, index)
    check_version(run_dir, index, version)
    return version, run_dir.fetch_dir(f"{index}/{version}")


def publish(
    run_dir: RunDir,
    index: str,
    key: Mapping[str, Any],
    build: Callable[[Path, str], dict[str, Any]],
    *,
    keep_versions: int = 3,
) -> tuple[str, dict[str, Any]]:
    """Write a new version of ``index`` and point ``CURRENT`` at it; then prune old versions.

    Args:
        key: what the index is built from (hashed into the version name).
        build: ``build(out_dir, version) -> manifest``: writes the version's files into ``out_dir``.
        keep_versions: complete versions kept after publishing (the current one always among them).

    Returns:
        (version, manifest).
    """
    version = new_version(key)
    while run_dir.exists(f"{index}/{version}"):  # same microsecond and key: never overwrite a version
        time.sleep(1e-3)
        version = new_version(key)
    with run_dir.staged_dir(f"{index}/{version}") as out:
        manifest = build(out, version)
    pointer = {"version": version, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "vectors": manifest.get("vectors"), "encoder": manifest.get("encoder"),
               "factory": manifest.get("factory"), "num_shards": manifest.get("num_shards")}
    run_dir.write_json(f"{index}/{CURRENT}", pointer)
    log.info("index: %s now points to version %s", run_dir.path(f"{index}/{CURRENT}"), version)
    prune(run_dir, index, keep_versions)
    return version, manifest


def prune(run_dir: RunDir, index: str, keep_versions: int) -> list[str]:
    """Delete the oldest complete versions beyond ``keep_versions`` (never the current one) and the files of the old
    flat layout once a pointer exists. Returns the removed version names.

    A replica still serving a removed version keeps working (its files are open or mapped); a new replica of it
    would fail to start, so keep at least as many versions as can be served at once (rollouts: 2)."""
    if keep_versions < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
    current = read_pointer(run_dir, index)["version"]
    versions = list_versions(run_dir, index)
    keep = set(versions[-keep_versions:]) | {current}
    removed = []
    for v in versions:
        if v not in keep:
            run_dir.remove(f"{index}/{v}/{SUCCESS_MARKER}")  # incomplete first: never a half-deleted "complete" one
            run_dir.remove(f"{index}/{v}")
            removed.append(v)
    legacy = [n for n in run_dir.listdir(index) if _LEGACY_FILES.match(n)]
    if legacy:
        run_dir.remove(f"{index}/{SUCCESS_MARKER}")
        for n in legacy:
            run_dir.remove(f"{index}/{n}")
    if removed:
        log.info("index: removed old versions %s (keeping %d)", removed, keep_versions)
    return removed


def resolve_local(index_dir: Path) -> Path:
    """The version directory a local index path stands for: itself when it holds ``manifest.json`` (a version, or the
    old flat layout), else the version its ``CURRENT`` names."""
    index_dir = Path(index_dir)
    pointer = index_dir / CURRENT
    if pointer.exists():
        try:
            version = json.loads(pointer.read_text(encoding="utf-8"))["version"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise IndexVersionError(f"{pointer}: not a valid index pointer ({e})") from e
        target = index_dir / version
        if not (target / SUCCESS_MARKER).exists():
            raise IndexVersionError(f"{target}: missing or incomplete index version (named by {pointer})")
        return target
    return index_dir
