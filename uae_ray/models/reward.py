"""Cross-encoder reward model r(q, d): build (for training), save as a ``CrossEncoder`` directory, load and score.

Training builds an ``AutoModelForSequenceClassification`` with one output (``num_labels=1``); from an encoder
checkpoint such as the embedded MiniLM the head is freshly initialised (transformers reports it as missing:
expected). :func:`save_reward_model` writes a directory that ``sentence_transformers.CrossEncoder(path)`` loads as it
is: the config (``num_labels=1``, and the identity activation under ``config.sentence_transformers``, so
``CrossEncoder.predict`` returns the raw logits r(q, d) instead of their sigmoid), the tokenizer, and its
``model_max_length`` = the training ``max_length`` (pairs truncated longest-first, as in training). Scoring
(:func:`score_pairs`, :class:`RewardScoreBatch`) is ``CrossEncoder.predict``.

Models only encode: the loss is :func:`uae_ray.losses.reward_listwise_loss`, training is in :mod:`uae_ray.training`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from uae_ray.models.registry import (
    ModelNotFoundError,
    load_sentence_transformers_model,
    resolve,
    resolve_model_on_worker,
)

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

#: ``CrossEncoder`` reads its activation from ``config.sentence_transformers["activation_fn"]`` (a ``torch.``
#: path): identity, so a loaded reward model scores raw logits, the scale the listwise loss trained.
IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"


def build_reward_model(name: str, device: str = "cpu") -> tuple[Any, Any]:
    """A fresh, trainable (model, tokenizer) for ``name`` (registry name, local dir or hub id); not cached.

    Args:
        name: base checkpoint; an encoder gets a new one-output regression head.
        device: torch device.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ref = resolve(name)
    if ref.gguf_file is not None:
        raise ModelNotFoundError(f"{name}: a GGUF generator cannot be a cross-encoder reward model")
    try:
        tok = AutoTokenizer.from_pretrained(ref.path)
        model = AutoModelForSequenceClassification.from_pretrained(ref.path, num_labels=1)
    except OSError as e:
        raise ModelNotFoundError(f"{name}: could not load as a cross-encoder ({e})") from e
    if model.config.num_labels != 1:
        raise ModelNotFoundError(f"{name}: has {model.config.num_labels} outputs; a reward model needs 1")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    return model.to(device), tok


def save_reward_model(model: Any, tokenizer: Any, path: str | Path, max_length: int) -> None:
    """Write ``model`` and ``tokenizer`` to ``path`` as a directory ``CrossEncoder(path)`` loads and scores as uae-ray.

    Args:
        model: a one-output sequence-classification model (e.g. from :func:`build_reward_model`, trained).
        tokenizer: its tokenizer; saved with ``model_max_length = max_length``.
        path: an existing local directory (e.g. a :meth:`uae_ray.runtime.RunDir.staged_dir`).
        max_length: tokens per (question, passage) pair the model was trained with.
    """
    if model.config.num_labels != 1:
        raise ValueError(f"a reward model has one output; this one has {model.config.num_labels}")
    model.config.sentence_transformers = {"activation_fn": IDENTITY_ACTIVATION}
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(path)


def read_reward_model(path: str, device: str = "cpu") -> CrossEncoder:
    """The ``CrossEncoder`` of a reward model directory (or a hub cross-encoder id), in eval mode; not cached.

    Raises:
        ModelNotFoundError: ``path`` does not load as a cross-encoder with one output.
    """
    from sentence_transformers import CrossEncoder

    model = load_sentence_transformers_model(CrossEncoder, path, device, "a cross-encoder reward model")
    if model.num_labels != 1:
        raise ModelNotFoundError(f"{path}: has {model.num_labels} outputs; a reward model needs 1")
    return model


@functools.lru_cache(maxsize=4)
def load_reward_model(path: str, device: str = "cpu") -> CrossEncoder:
    """:func:`read_reward_model`, once per process (do not train the cached instance)."""
    return read_reward_model(path, device)


def tokenize_pairs(tokenizer: Any, questions: list[str], passages: list[str], max_length: int) -> dict[str, Any]:
    """Tokenize (question, passage) pairs for training, as ``CrossEncoder`` does for scoring: one sequence per pair,
    the longer side truncated first.

    Returns:
        dict of [n, L] tensors (input_ids, attention_mask, and token_type_ids where the model has them).
    """
    if len(questions) != len(passages):
        raise ValueError(f"{len(questions)} questions but {len(passages)} passages: pairs must align")
    return tokenizer(
        questions, passages, padding=True, truncation="longest_first", max_length=max_length, return_tensors="pt"
    )


def score_pairs(
    model: CrossEncoder, questions: list[str], passages: list[str], *, max_length: int = 256, batch_size: int = 32,
) -> np.ndarray:
    """Reward scores r(q, d) (raw logits) of aligned (question, passage) pairs, by ``CrossEncoder.predict``.

    Args:
        model: the reward model (see :func:`load_reward_model`).
        questions: n question strings.
        passages: n passage strings (``passages[i]`` is scored with ``questions[i]``).
        max_length: tokens per pair (question + passage), truncating the longer side first.
        batch_size: pairs per forward pass (``predict`` sorts pairs by length first).

    Returns:
        float32 array [n] of scores (higher = more useful).
    """
    import torch

    if len(questions) != len(passages):
        raise ValueError(f"{len(questions)} questions but {len(passages)} passages: pairs must align")
    if not questions:
        return np.zeros(0, dtype=np.float32)
    pairs = [(str(q), str(p)) for q, p in zip(questions, passages, strict=True)]
    scores = model.predict(
        pairs, batch_size=batch_size, activation_fn=torch.nn.Identity(), convert_to_numpy=True,
        show_progress_bar=False, processing_kwargs={"text": {"max_length": max_length}},
    )
    return np.asarray(scores, dtype=np.float32).reshape(len(pairs))


class RewardScoreBatch:
    """Ray Data callable class: adds ``output_column`` (float32) = r(question, text) to each batch.

    Use with ``map_batches(RewardScoreBatch, fn_constructor_kwargs={"model_path": ...},
    compute=ray.data.ActorPoolStrategy(...))``; the model loads once per actor.

    Args:
        model_path: reward model directory, registry name / hub id, or ``run:<dir>`` (a model directory of the run
            dir ``run_dir``, fetched on the actor's own node: a run dir on S3/GCS works on a cluster).
        run_dir: the run directory's URI (needed for ``run:`` paths).
        max_length: tokens per pair.
        batch_size: pairs per forward pass inside one Ray Data batch.
        question_column / text_column / output_column: column names.
    """

    def __init__(
        self, model_path: str, max_length: int = 256, batch_size: int = 32, question_column: str = "question",
        text_column: str = "text", output_column: str = "teacher_score", run_dir: str | None = None,
    ) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_reward_model(resolve_model_on_worker(model_path, run_dir), device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.question_column = question_column
        self.text_column = text_column
        self.output_column = output_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for col in (self.question_column, self.text_column):
            if col not in batch:
                raise KeyError(f"RewardScoreBatch: batch has no column {col!r} (columns: {sorted(batch)})")
        batch[self.output_column] = score_pairs(
            self.model, list(batch[self.question_column]), list(batch[self.text_column]),
            max_length=self.max_length, batch_size=self.batch_size,
        )
        return batch
