"""Sharded FAISS index: :func:`build_sharded_index` writes it, :class:`ShardedIndex` searches and merges it exactly."""

from uae_ray.index.build import IndexBuildError, build_sharded_index
from uae_ray.index.search import IndexLoadError, ShardedIndex, merge_topk

__all__ = ["IndexBuildError", "IndexLoadError", "ShardedIndex", "build_sharded_index", "merge_topk"]
