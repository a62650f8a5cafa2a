"""Deterministic by-document splits: every query of a document lands in the same split, so no evaluation passage
(all passages of a document share its split) is ever a training query's document."""

from __future__ import annotations

import hashlib

from uae_ray.config import SplitRatios


def hash_unit(doc_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by ``seed`` and ``doc_id`` (sha1, so stable across runs, machines and Python)."""
    digest = hashlib.sha1(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_for_document(doc_id: str, ratios: SplitRatios, seed: int) -> str:
    """train / dev / test for ``doc_id`` with probabilities ``ratios`` (independent of order and of other docs)."""
    u = hash_unit(doc_id, seed)
    if u < ratios.train:
        return "train"
    if u < ratios.train + ratios.dev:
        return "dev"
    return "test"
