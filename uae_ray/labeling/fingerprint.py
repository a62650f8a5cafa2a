"""Content fingerprints of utility labels: a label is reused exactly when what determined its numbers is the same.

Three keys, each a hex SHA-256 (128 bits kept) of a canonical JSON list:

- :func:`settings_key`: every label setting that changes the numbers: generator, backend, the dtype actually used
  (``auto`` resolved), ``max_model_len``, ``max_passage_tokens``, ``answer_aggregate``, the system prompt, both user
  templates, the stored ``prompt_version`` and :data:`LABEL_CODE_VERSION`. Settings that only say where or how fast
  the work runs (actor pool sizes, batch sizes, ``rows_per_part``, ``rows_per_batch``, splits) are not in it.
- :func:`baseline_fingerprint`: settings key + question + the answers scored (:func:`usable_answers`): the
  no-passage term log p(a | q).
- :func:`pair_fingerprint`: baseline fingerprint + passage text: one pair's utility.

A pair's qid and pid (positions, ``{doc}#{k}``) are never part of a key: editing a passage's text, a question or its
answers, or a label setting gives new fingerprints (those pairs are labeled again), and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from uae_ray.labeling.prompts import (
    USER_TEMPLATE_NO_PASSAGE,
    USER_TEMPLATE_WITH_PASSAGE,
    prompt_version_for,
    system_prompt_for,
)

if TYPE_CHECKING:
    from uae_ray.config import LabelConfig

#: Bump when the scoring code changes the numbers it produces for the same inputs (every label becomes new).
LABEL_CODE_VERSION = 1

AGGREGATES = ("first", "max", "mean")


def _digest(parts: list) -> str:
    text = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def usable_answers(answers: list[str] | None, aggregate: str) -> list[str]:
    """The answers that will be scored: stripped, empty ones removed; only the first for ``aggregate=first``."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown answer aggregate {aggregate!r}; use one of {AGGREGATES}")
    kept = [a.strip() for a in (answers or []) if a is not None and a.strip()]
    return kept[:1] if aggregate == "first" else kept


def label_device(cfg: LabelConfig) -> str:
    """The device kind the label stage's actors score on: ``cuda`` when each actor gets a GPU, else ``cpu``."""
    return "cuda" if cfg.pool.num_gpus > 0 else "cpu"


def settings_key(cfg: LabelConfig, dtype: str) -> str:
    """Hash of every setting of ``cfg`` that changes label numbers; ``dtype`` is the resolved one (never ``auto``)."""
    if dtype == "auto":
        raise ValueError("settings_key needs the dtype actually used (resolve 'auto' first)")
    return _digest([
        "uae-ray-label", LABEL_CODE_VERSION, cfg.generator, cfg.backend, dtype, cfg.max_model_len,
        cfg.max_passage_tokens, cfg.answer_aggregate, system_prompt_for(cfg), USER_TEMPLATE_WITH_PASSAGE,
        USER_TEMPLATE_NO_PASSAGE, prompt_version_for(cfg),
    ])


def baseline_fingerprint(settings: str, question: str, answers: list[str]) -> str:
    """Key of the no-passage term of ``question`` with the scored ``answers`` (already :func:`usable_answers`)."""
    return _digest(["baseline", settings, question, answers])


def pair_fingerprint(baseline: str, passage: str) -> str:
    """Key of one pair's utility: its baseline fingerprint (settings, question, answers) and the passage text."""
    return _digest(["pair", baseline, passage])
