"""Expected utility from a retriever's score: a monotone calibration fitted on labeled (score, utility) pairs.

A cosine score means nothing to a RAG caller deciding how many passages to give its LLM. The utility labels do: u(q, d)
is the drop in the generator's log-perplexity of the gold answer (nats) that passage d brings. An isotonic regression
from the student's score to u, fitted on held-out labeled pairs, turns every hit's score into an *expected utility*
in nats, non-decreasing in the score by construction.

Stored as JSON (``calibration.json``) beside the encoder and copied into each index version, so a served index and
its calibration always come from the same encoder. Prediction is ``np.interp`` over the fitted knots, clipped at both
ends: the same piecewise-linear function scikit-learn's ``IsotonicRegression.predict`` computes, without needing
scikit-learn at serving time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CALIBRATION_FILE = "calibration.json"


class CalibrationError(ValueError):
    """A calibration file or fit input that cannot be used (names the file or the field)."""


@dataclass(frozen=True)
class UtilityCalibration:
    """A monotone map from a retriever score to expected utility (nats of answer log-perplexity reduction).

    Args:
        score_knots: increasing scores where the fitted function has its knots.
        utility_knots: the expected utility at each knot (non-decreasing).
        n_pairs: labeled pairs the fit used.
        score: what the scores are ("cosine" for the student's normalized embeddings).
        source: where the pairs came from (split and table), for the report.
    """

    score_knots: tuple[float, ...]
    utility_knots: tuple[float, ...]
    n_pairs: int
    score: str = "cosine"
    source: str = ""

    def __post_init__(self) -> None:
        x, y = np.asarray(self.score_knots, float), np.asarray(self.utility_knots, float)
        if x.ndim != 1 or x.size == 0 or x.shape != y.shape:
            raise CalibrationError("score_knots and utility_knots must be non-empty lists of the same length")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise CalibrationError("calibration knots must be finite")
        if np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
            raise CalibrationError("calibration knots must be non-decreasing in score and in utility")

    def expected_utility(self, scores: np.ndarray) -> np.ndarray:
        """Expected utility (nats) of each score; shape as ``scores``. Clipped to the fitted range at both ends."""
        return np.interp(np.asarray(scores, dtype=np.float64), self.score_knots, self.utility_knots)


def fit_calibration(scores: np.ndarray, utilities: np.ndarray, *, score: str = "cosine",
                    source: str = "") -> UtilityCalibration:
    """Fit an increasing isotonic regression of ``utilities`` on ``scores`` (both shape [n_pairs])."""
    from sklearn.isotonic import IsotonicRegression

    s, u = np.asarray(scores, dtype=np.float64), np.asarray(utilities, dtype=np.float64)
    if s.shape != u.shape or s.ndim != 1:
        raise CalibrationError(f"scores and utilities must be 1-d of one length, got {s.shape} and {u.shape}")
    keep = np.isfinite(s) & np.isfinite(u)
    if keep.sum() < 2:
        raise CalibrationError(f"need at least 2 finite (score, utility) pairs to calibrate, got {int(keep.sum())}")
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(s[keep], u[keep])
    return UtilityCalibration(
        score_knots=tuple(float(v) for v in iso.X_thresholds_),
        utility_knots=tuple(float(v) for v in iso.y_thresholds_),
        n_pairs=int(keep.sum()), score=score, source=source,
    )


def save_calibration(calibration: UtilityCalibration, path: str | Path) -> None:
    """Write ``calibration`` as JSON to ``path`` (a file, usually ``<dir>/calibration.json``)."""
    Path(path).write_text(json.dumps(asdict(calibration), indent=1) + "\n")


def load_calibration(path: str | Path) -> UtilityCalibration:
    """Read a calibration JSON; a clear error naming the file when it is malformed."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return UtilityCalibration(
            score_knots=tuple(raw["score_knots"]), utility_knots=tuple(raw["utility_knots"]),
            n_pairs=int(raw["n_pairs"]), score=str(raw.get("score", "cosine")), source=str(raw.get("source", "")),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CalibrationError(f"{path}: not a usable utility calibration ({err})") from err


def choose_k(expected_utility: np.ndarray, n_tokens: np.ndarray | None = None, *,
             min_expected_utility: float | None = None, max_context_tokens: int | None = None) -> int:
    """How many of a ranked list of hits to keep: the longest prefix whose hits all clear ``min_expected_utility``
    and whose passages fit in ``max_context_tokens`` together.

    Args:
        expected_utility: [k_max] expected utility of the hits in rank order.
        n_tokens: [k_max] passage lengths in tokens (needed with ``max_context_tokens``).
        min_expected_utility: keep hits while their expected utility is at least this (None: no floor).
        max_context_tokens: keep hits while their summed lengths stay within this budget (None: no budget).

    Returns:
        k in [0, k_max]. 0 means no hit is expected to help (the caller may answer without retrieval).
    """
    eu = np.asarray(expected_utility, dtype=np.float64)
    keep = np.ones(eu.shape[0], dtype=bool)
    if min_expected_utility is not None:
        keep &= eu >= min_expected_utility
    if max_context_tokens is not None:
        if n_tokens is None:
            raise CalibrationError("max_context_tokens needs the hits' token counts")
        keep &= np.cumsum(np.asarray(n_tokens, dtype=np.int64)) <= max_context_tokens
    # The prefix up to the first hit that fails either rule.
    return int(np.argmin(keep)) if not keep.all() else int(keep.shape[0])
