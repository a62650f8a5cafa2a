"""The utility calibration: isotonic fit, monotone prediction, JSON round trip, and k chosen by expected utility."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from uae_ray.calibration import CalibrationError, choose_k, fit_calibration, load_calibration, save_calibration


def test_fit_is_monotone_and_matches_sklearn(tmp_path) -> None:
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(0)
    s = rng.uniform(-0.2, 0.9, 400)
    u = 2.0 * s + rng.normal(0, 0.5, 400)
    cal = fit_calibration(s, u, source="dev")
    grid = np.linspace(-0.5, 1.2, 301)
    pred = cal.expected_utility(grid)
    assert np.all(np.diff(pred) >= 0)
    ref = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(s, u).predict(grid)
    np.testing.assert_allclose(pred, ref, atol=1e-9)
    save_calibration(cal, tmp_path / "calibration.json")
    again = load_calibration(tmp_path / "calibration.json")
    np.testing.assert_allclose(again.expected_utility(grid), pred)
    assert again.n_pairs == 400 and again.source == "dev"


def test_load_names_the_file_when_malformed(tmp_path) -> None:
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"score_knots": [0.0, 1.0], "utility_knots": [1.0, 0.0], "n_pairs": 2}))
    with pytest.raises(CalibrationError, match=r"calibration\.json"):
        load_calibration(bad)


def test_choose_k_by_floor_and_budget() -> None:
    eu = np.array([1.2, 0.8, 0.3, 0.05])
    toks = np.array([100, 150, 80, 60])
    assert choose_k(eu) == 4
    assert choose_k(eu, min_expected_utility=0.5) == 2
    assert choose_k(eu, min_expected_utility=2.0) == 0
    assert choose_k(eu, toks, max_context_tokens=260) == 2
    assert choose_k(eu, toks, min_expected_utility=0.1, max_context_tokens=1000) == 3
    with pytest.raises(CalibrationError):
        choose_k(eu, max_context_tokens=10)


# ------------------------------------------------------------------------------------------------ in a run dir
def test_match_floor_gives_the_mean_k_and_choose_k_applies_it() -> None:
    from uae_ray.eval.calibrate import match_floor

    # three queries, expected utility of their top 3 (non-increasing along each row)
    eu = np.array([[2.0, 1.5, 1.0], [0.4, 0.3, 0.2], [1.2, 0.9, 0.1]])
    f1 = match_floor(eu, 1.0)
    ks = [choose_k(row, min_expected_utility=f1) for row in eu]
    assert np.mean(ks) == 1.0 and ks == [2, 0, 1]  # the useful query gets two passages, the useless one none
    f2 = match_floor(eu, 2.0)
    assert np.mean([choose_k(row, min_expected_utility=f2) for row in eu]) == 2.0
    assert match_floor(eu, 0.0) > eu.max()  # k = 0 everywhere


def test_decile_table_and_crossfit() -> None:
    from uae_ray.eval.calibrate import crossfit_expected, decile_table

    rng = np.random.default_rng(1)
    s = rng.uniform(0, 1, 500)
    u = 3 * s + rng.normal(0, 0.3, 500)
    groups = [f"q{i // 10}" for i in range(500)]
    cal = fit_calibration(s, u)
    cv = crossfit_expected(s, u, groups)
    rows = decile_table(s, u, cal.expected_utility(s), cv)
    assert [r["decile"] for r in rows] == list(range(1, 11)) and sum(r["n"] for r in rows) == 500
    assert all(a["score_max"] <= b["score_min"] for a, b in itertools.pairwise(rows))
    assert all(np.diff([r["expected"] for r in rows]) >= 0)
    # a well-specified model: every decile's measured mean within 0.15 nats of the out-of-sample expectation
    assert max(abs(r["expected_cv"] - r["measured"]) for r in rows) < 0.15
    assert crossfit_expected(s, u, ["one"] * 500) is None


def test_heldout_pairs_prefer_dev_and_fall_back_in_sample(tmp_path) -> None:
    import pyarrow as pa

    from uae_ray.data import schema as S
    from uae_ray.eval.calibrate import heldout_pairs
    from uae_ray.runtime import RunDir

    rd = RunDir(tmp_path / "run")
    assert heldout_pairs(rd, ["train"]) is None  # no labels at all
    rd.write_table(S.QUERIES, pa.table({"qid": ["a", "b"], "split": ["train", "dev"]}))
    rd.write_table(f"{S.UTILITIES}/part-0.parquet", pa.table({
        "qid": ["a", "a", "b", "b", "b", "zz"], "pid": ["p1", "p2", "p1", "p2", "p3", "p1"],
        "utility": [1.0, 2.0, 0.5, -0.5, 0.25, 9.0]}))
    dev = heldout_pairs(rd, ["train"])
    assert dev.split == "dev" and not dev.in_sample and sorted(dev.pids) == ["p1", "p2", "p3"]
    own = heldout_pairs(rd, ["train", "dev"])  # everything labeled was trained on: stated, not hidden
    assert own.split == "dev" and own.in_sample
    capped = heldout_pairs(rd, ["dev"], max_pairs=1)
    assert capped.split == "train" and len(capped.qids) == 2 and capped.queries_left_out == 0
