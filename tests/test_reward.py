"""Reward model: the saved directory is a sentence-transformers CrossEncoder that scores as uae-ray does; scoring in
process and through Ray Data, with the real MiniLM cross-encoder head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from uae_ray.models.registry import ModelNotFoundError
from uae_ray.models.reward import (
    RewardScoreBatch,
    build_reward_model,
    load_reward_model,
    read_reward_model,
    save_reward_model,
    score_pairs,
    tokenize_pairs,
)

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "What is the capital of France?"]
PASSAGES = [
    "Paris is the capital and most populous city of France.",
    "Hamlet is a tragedy written by William Shakespeare around 1600.",
    "The mitochondrion is the powerhouse of the cell. " * 40,  # longer than max_length: truncated, not an error
]
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A reward model directory as train-reward writes it (MiniLM with a fresh, seeded head), and the raw logits of
    the training-side model on (QUESTIONS, PASSAGES) computed with the training tokenization."""
    import torch

    torch.manual_seed(0)
    model, tok = build_reward_model("all-minilm-l6-v2")
    model.eval()
    with torch.inference_mode():
        logits = model(**tokenize_pairs(tok, QUESTIONS, PASSAGES, MAX_LENGTH)).logits.reshape(-1).numpy()
    d = tmp_path_factory.mktemp("reward") / "reward_model"
    d.mkdir()
    save_reward_model(model, tok, d, MAX_LENGTH)
    return d, logits


def test_saved_directory_loads_as_a_plain_cross_encoder_and_scores_as_uae_ray(saved):
    """A user's ``CrossEncoder(path)`` with no arguments: one label, the training max_length, identity activation,
    and ``predict`` = uae-ray's score_pairs = the raw logits of the model as trained."""
    from sentence_transformers import CrossEncoder

    d, train_logits = saved
    ce = CrossEncoder(str(d), device="cpu")
    assert ce.num_labels == 1
    assert ce.max_seq_length == MAX_LENGTH
    assert type(ce.activation_fn).__name__ == "Identity"
    user = ce.predict(list(zip(QUESTIONS, PASSAGES, strict=True)), show_progress_bar=False)
    ours = score_pairs(load_reward_model(str(d)), QUESTIONS, PASSAGES, max_length=MAX_LENGTH)
    np.testing.assert_allclose(user, ours, atol=1e-5)
    np.testing.assert_allclose(ours, train_logits, atol=1e-4)
    assert len(set(np.round(ours, 4))) == 3  # distinct pairs, distinct scores (not a constant head)


def test_score_pairs_shape_dtype_and_batch_invariance(saved):
    model = load_reward_model(str(saved[0]))
    a = score_pairs(model, QUESTIONS, PASSAGES, max_length=MAX_LENGTH, batch_size=1)
    b = score_pairs(model, QUESTIONS, PASSAGES, max_length=MAX_LENGTH, batch_size=32)
    assert a.dtype == np.float32 and a.shape == (3,)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert score_pairs(model, [], [], max_length=MAX_LENGTH).shape == (0,)
    # max_length per call: a longer budget sees more of the long passage
    longer = score_pairs(model, QUESTIONS[2:], PASSAGES[2:], max_length=256)
    assert abs(float(longer[0]) - float(a[2])) > 1e-4


def test_score_pairs_rejects_misaligned_pairs(saved):
    model = load_reward_model(str(saved[0]))
    with pytest.raises(ValueError, match="2 questions but 1 passages"):
        score_pairs(model, QUESTIONS[:2], PASSAGES[:1])


def test_load_reward_model_is_cached_and_checks_outputs(saved, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from uae_ray.models.registry import resolve

    assert load_reward_model(str(saved[0])) is load_reward_model(str(saved[0]))
    two = AutoModelForSequenceClassification.from_pretrained(resolve("all-minilm-l6-v2").path, num_labels=2)
    with pytest.raises(ValueError, match="one output; this one has 2"):
        save_reward_model(two, None, tmp_path, MAX_LENGTH)
    two.save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="has 2 outputs"):
        read_reward_model(str(tmp_path))


def test_reward_score_batch_in_ray_data(ray_session, saved, tmp_path):
    import shutil

    import ray

    from uae_ray.runtime import RunDir

    # the saved directory as the run dir's reward_model: the actors resolve "run:reward_model" themselves
    rd = RunDir(tmp_path / "run")
    with rd.staged_dir("reward_model") as d:
        shutil.copytree(saved[0], d, dirs_exist_ok=True)
    table = pa.table({"qid": ["q1", "q2", "q1"], "question": QUESTIONS, "text": PASSAGES})
    ds = ray.data.from_arrow(table).repartition(2).map_batches(
        RewardScoreBatch,
        fn_constructor_kwargs={"model_path": "run:reward_model", "run_dir": rd.uri, "max_length": MAX_LENGTH},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        batch_size=2,
        num_cpus=1,
    )
    out = ds.to_pandas().sort_values("text").reset_index(drop=True)
    expected = score_pairs(load_reward_model(str(saved[0])), list(out["question"]), list(out["text"]),
                           max_length=MAX_LENGTH)
    np.testing.assert_allclose(out["teacher_score"].to_numpy(np.float32), expected, atol=1e-4)
