"""Bi-encoder: load, and encode text to L2-normalised vectors (mean pooling, as the model's own modules define).

Models only encode: losses live in :mod:`uae_ray.losses`, training in :mod:`uae_ray.training`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

from uae_ray.models.registry import cpu_has_bf16, load_sentence_transformers_model, resolve_model_on_worker

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


@functools.lru_cache(maxsize=4)
def load_encoder(name: str, device: str = "cpu") -> SentenceTransformer:
    """A ``SentenceTransformer`` for ``name`` (registry name, local dir, or hub id), once per process.

    A plain transformers checkpoint without sentence-transformers modules gets mean pooling; the output is always
    L2-normalised by :func:`encode`.
    """
    from sentence_transformers import SentenceTransformer

    return load_sentence_transformers_model(SentenceTransformer, name, device, "an encoder")


def encode(
    model: Any, texts: list[str], *, batch_size: int = 64, max_length: int | None = None, bf16: bool = False
) -> np.ndarray:
    """Encode ``texts`` to a float32 array [n, dim] of unit vectors.

    Args:
        model: a SentenceTransformer.
        texts: strings to encode.
        batch_size: texts per forward pass.
        max_length: truncate to this many tokens (default: the model's own limit).
        bf16: autocast to bfloat16 on CPU (about 2x faster; cosine to fp32 >= 0.9999 on MiniLM).
    """
    import torch

    if max_length is not None:
        model.max_seq_length = max_length
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    device_type = "cuda" if str(model.device).startswith("cuda") else "cpu"
    with torch.inference_mode(), torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
        emb = model.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
    return np.ascontiguousarray(emb, dtype=np.float32)


class EncodeBatch:
    """Ray Data callable class: adds an ``embedding`` column (list<float32>) encoding ``text_column``.

    The model is loaded once per actor in ``__init__``; use with ``map_batches(EncodeBatch, fn_constructor_kwargs=
    {...}, compute=ray.data.ActorPoolStrategy(...))``.

    Args:
        encoder: registry name, hub id, local path, or ``run:<dir>`` (a model directory of the run dir ``run_dir``).
            ``run:`` specs are resolved on the actor's own node, so a run dir on S3/GCS works on a cluster: each node
            fetches the model once into its local cache, and no driver-local path is shipped to other nodes.
        run_dir: the run directory's URI (needed for ``run:`` specs).
        text_column: column to encode; max_length: tokens per text; bf16: autocast on CPU (None: where native).
    """

    def __init__(
        self, encoder: str, text_column: str = "text", max_length: int | None = None, bf16: bool | None = None,
        run_dir: str | None = None,
    ):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_encoder(resolve_model_on_worker(encoder, run_dir), device)
        self.text_column = text_column
        self.max_length = max_length
        # None: bf16 autocast only on a CPU with native bf16 units (emulated bf16 is far slower than fp32)
        self.bf16 = device == "cpu" and (cpu_has_bf16() if bf16 is None else bf16)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch[self.text_column]]
        emb = encode(self.model, texts, batch_size=len(texts), max_length=self.max_length, bf16=self.bf16)
        batch["embedding"] = list(emb)
        return batch
