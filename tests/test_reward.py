"""Reward model: scoring with the real MiniLM cross-encoder head, in process and through Ray Data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from uae_ray.models.reward import RewardScoreBatch, load_reward_model, score_pairs

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "What is the capital of France?"]
PASSAGES = [
    "Paris is the capital and most populous city of France.",
    "Hamlet is a tragedy written by William Shakespeare around 1600.",
    "The mitochondrion is the powerhouse of the cell. " * 40,  # longer than max_length: truncated, not an error
]


def test_score_pairs_shape_dtype_and_batch_invariance():
    model, tok = load_reward_model("all-minilm-l6-v2")
    a = score_pairs(model, tok, QUESTIONS, PASSAGES, max_length=64, batch_size=1)
    b = score_pairs(model, tok, QUESTIONS, PASSAGES, max_length=64, batch_size=32)
    assert a.dtype == np.float32 and a.shape == (3,)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert score_pairs(model, tok, [], [], max_length=64).shape == (0,)


def test_score_pairs_rejects_misaligned_pairs():
    model, tok = load_reward_model("all-minilm-l6-v2")
    with pytest.raises(ValueError, match="2 questions but 1 passages"):
        score_pairs(model, tok, QUESTIONS[:2], PASSAGES[:1])


def test_load_reward_model_is_cached():
    assert load_reward_model("all-minilm-l6-v2") is load_reward_model("all-minilm-l6-v2")


def test_reward_score_batch_in_ray_data(ray_session, tmp_path):
    import ray

    # a saved directory, so the actor and this process hold the same head (a fresh head is random per load)
    # saved as the run dir's reward_model: the actors resolve "run:reward_model" themselves (no driver-local path)
    from uae_ray.runtime import RunDir

    model, tok = load_reward_model("all-minilm-l6-v2")
    rd = RunDir(tmp_path / "run")
    with rd.staged_dir("reward_model") as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
    table = pa.table({"qid": ["q1", "q2", "q1"], "question": QUESTIONS, "text": PASSAGES})
    ds = ray.data.from_arrow(table).repartition(2).map_batches(
        RewardScoreBatch,
        fn_constructor_kwargs={"model_path": "run:reward_model", "run_dir": rd.uri, "max_length": 64},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        batch_size=2,
        num_cpus=1,
    )
    out = ds.to_pandas().sort_values("text").reset_index(drop=True)
    expected = score_pairs(model, tok, list(out["question"]), list(out["text"]), max_length=64)
    np.testing.assert_allclose(out["teacher_score"].to_numpy(np.float32), expected, atol=1e-4)
