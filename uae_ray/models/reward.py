"""Cross-encoder reward model r(q, d): load, tokenize pairs, and score them (also as a Ray Data UDF).

The model is an ``AutoModelForSequenceClassification`` with one output (``num_labels=1``). From an encoder checkpoint
such as the embedded MiniLM the head is freshly initialised (transformers reports it as missing: expected); a
``reward_model/`` directory written by ``uae-ray train-reward`` loads with its trained head.

Models only encode: the loss is :func:`uae_ray.losses.reward_listwise_loss`, training is in :mod:`uae_ray.training`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from uae_ray.models.registry import ModelNotFoundError, resolve


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


@functools.lru_cache(maxsize=4)
def load_reward_model(path: str, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a reward model directory (or any name :func:`build_reward_model` takes), once per process.

    The model is in eval mode; do not train the cached instance.
    """
    model, tok = build_reward_model(path, device)
    model.eval()
    return model, tok


def tokenize_pairs(tokenizer: Any, questions: list[str], passages: list[str], max_length: int) -> dict[str, Any]:
    """Tokenize (question, passage) pairs as one sequence each, truncating the longer side first.

    Returns:
        dict of [n, L] tensors (input_ids, attention_mask, and token_type_ids where the model has them).
    """
    if len(questions) != len(passages):
        raise ValueError(f"{len(questions)} questions but {len(passages)} passages: pairs must align")
    return tokenizer(
        questions, passages, padding=True, truncation="longest_first", max_length=max_length, return_tensors="pt"
    )


def score_pairs(
    model: Any, tokenizer: Any, questions: list[str], passages: list[str], *, max_length: int = 256,
    batch_size: int = 32,
) -> np.ndarray:
    """Reward scores r(q, d) of aligned (question, passage) pairs.

    Args:
        model: a one-output sequence-classification model (see :func:`load_reward_model`).
        tokenizer: its tokenizer.
        questions: n question strings.
        passages: n passage strings (``passages[i]`` is scored with ``questions[i]``).
        max_length: tokens per pair (question + passage), truncating the longer side first.
        batch_size: pairs per forward pass.

    Returns:
        float32 array [n] of scores (higher = more useful).
    """
    import torch

    if len(questions) != len(passages):
        raise ValueError(f"{len(questions)} questions but {len(passages)} passages: pairs must align")
    out = np.zeros(len(questions), dtype=np.float32)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(questions), batch_size):
            qs = [str(q) for q in questions[start : start + batch_size]]
            ps = [str(p) for p in passages[start : start + batch_size]]
            feats = {k: v.to(device) for k, v in tokenize_pairs(tokenizer, qs, ps, max_length).items()}
            logits = model(**feats).logits.reshape(-1)
            out[start : start + len(qs)] = logits.float().cpu().numpy()
    if was_training:
        model.train()
    return out


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

        from uae_ray.index.source import resolve_on_worker

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_reward_model(resolve_on_worker(model_path, run_dir), device)
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
            self.model, self.tokenizer, list(batch[self.question_column]), list(batch[self.text_column]),
            max_length=self.max_length, batch_size=self.batch_size,
        )
        return batch
