"""The utility calibration: isotonic fit, monotone prediction, JSON round trip, and k chosen by expected utility."""

from __future__ import annotations

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
