"""Utility labels on Ray Data, HF backend: the scorer actors (callable classes for ``map_batches``).

The numbers come from the pure core, :mod:`uae_ray.labeling.core` (aggregation, fingerprints, joins, cache rows);
this module only wraps a scorer into Ray Data actors. The vLLM backend runs through Ray Data LLM instead
(:mod:`uae_ray.labeling.vllm_scorer`). The core's names are re-exported here for existing imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from uae_ray.labeling.core import (
    AGGREGATES,
    PAIR_INPUT_COLUMNS,
    PairResults,
    aggregate_answers,
    attach_fingerprints,
    baseline_logprobs,
    cache_rows,
    join_pair_inputs,
    label_pairs_local,
    label_pairs_with_skips,
    score_pair_rows,
    usable_answers,
)

if TYPE_CHECKING:
    from uae_ray.config import LabelConfig

__all__ = [
    "AGGREGATES",
    "PAIR_INPUT_COLUMNS",
    "BaselineBatch",
    "LabelPairsBatch",
    "PairResults",
    "ScorerSettingsError",
    "aggregate_answers",
    "attach_fingerprints",
    "baseline_logprobs",
    "cache_rows",
    "join_pair_inputs",
    "label_pairs_local",
    "label_pairs_with_skips",
    "score_pair_rows",
    "usable_answers",
]


# ------------------------------------------------------------------------------------------------ Ray Data UDFs
class ScorerSettingsError(RuntimeError):
    """An actor would label under other settings than the driver keyed the pairs with (e.g. ``dtype: auto``
    resolved differently on a worker node than on the driver): its rows would carry wrong fingerprints."""


class _ScorerActor:
    """A scorer loaded once per actor; it checks that its settings key (with the dtype it actually loaded) is the
    one the driver fingerprinted the rows with."""

    def __init__(self, cfg: LabelConfig, generator: str, prompt_version: str, settings: str) -> None:
        import socket

        from uae_ray.labeling.fingerprint import settings_key
        from uae_ray.labeling.scorers import make_scorer

        self.cfg = cfg
        self.generator = generator
        self.prompt_version = prompt_version
        self.settings = settings
        self.scorer = make_scorer(cfg)
        mine = settings_key(cfg, self.scorer.dtype)
        if mine != settings:
            raise ScorerSettingsError(
                f"label actor on {socket.gethostname()}: scorer loaded with dtype {self.scorer.dtype!r} (label.dtype="
                f"{cfg.dtype!r}), which gives settings key {mine}, not the driver's {settings}: the driver resolved "
                "the dtype for another device. Set label.dtype explicitly (float32 or bfloat16)."
            )


class BaselineBatch(_ScorerActor):
    """Ray Data callable class: (qid, question, answers) -> ``LABEL_BASELINE_SCHEMA`` rows + ``tokens`` column."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        before = getattr(self.scorer, "tokens_processed", 0)
        out = baseline_logprobs(
            self.scorer, batch, self.cfg.answer_aggregate, generator=self.generator, prompt_version=self.prompt_version,
            settings=self.settings,
        )
        tokens = getattr(self.scorer, "tokens_processed", 0) - before
        return out.append_column("tokens", pa.array([tokens] + [0] * (out.num_rows - 1), pa.int64()))


class LabelPairsBatch(_ScorerActor):
    """Ray Data callable class: :data:`PAIR_INPUT_COLUMNS` rows -> ``LABEL_CACHE_SCHEMA`` rows + ``tokens``.

    Skipped pairs come back as rows with a non-empty ``skip_reason`` (NaN values).
    """

    def __call__(self, batch: pa.Table) -> pa.Table:
        res = score_pair_rows(
            self.scorer, batch, self.cfg.answer_aggregate, generator=self.generator, prompt_version=self.prompt_version
        )
        return cache_rows(res, self.settings)
