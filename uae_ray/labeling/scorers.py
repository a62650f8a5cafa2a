"""Scorers: mean log-probability of a gold answer under the generator, given a prompt with or without a passage.

Every backend shares :class:`PromptEncoder`, so the token ids scored are identical across backends: the chat template
is applied to :func:`~uae_ray.labeling.prompts.build_messages` (with the generation prompt), the passage is first cut
to ``max_passage_tokens`` generator tokens, and the answer is tokenized on its own and appended. Only the answer tokens
are scored, never the closing end-of-turn token (it gets about -15.7 after a short answer and would swamp the mean).

Backends:

- :class:`HFScorer` (transformers, CPU or GPU): :func:`uae_ray.models.lm.continuation_logprobs` (length-sorted
  left-padded batches, ``logits_to_keep`` = longest answer + 1, log-softmax in float32), the same function UPR uses.
- vLLM (:mod:`uae_ray.labeling.vllm_scorer`): the label stage runs vLLM engines through Ray Data LLM with
  ``prompt_logprobs`` on the token ids of this encoder; there is no in-process vLLM scorer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from uae_ray.labeling.prompts import build_messages, system_prompt_for
from uae_ray.models.lm import continuation_logprobs, cut_to_tokens

if TYPE_CHECKING:
    from uae_ray.config import LabelConfig

#: Skip reasons, as reported in label_report.json.
SKIP_EMPTY_ANSWER = "empty_answer"
SKIP_TOO_LONG = "prompt_too_long"
SKIP_INFERENCE_ERROR = "inference_error"  # vLLM engine error on a row: reported, not cached (a rerun retries)


@dataclass(frozen=True)
class ScoreItem:
    """One scoring request: log p(answer | prompt(question, passage)); ``passage=None`` is the no-passage prompt."""

    question: str
    answer: str
    passage: str | None


class BadItemError(ValueError):
    """An item that cannot be scored; ``reason`` is one of the ``SKIP_*`` constants."""

    def __init__(self, index: int, reason: str, detail: str) -> None:
        super().__init__(f"item {index}: {reason}: {detail}")
        self.index = index
        self.reason = reason


class Scorer(Protocol):
    """Answer log-probabilities under a generator; every backend implements this."""

    #: the dtype the model actually runs in (``auto`` resolved): part of every label's fingerprint
    dtype: str

    def answer_logprobs(self, items: list[ScoreItem]) -> list[tuple[float, int]]:
        """(mean log-prob over answer tokens, number of answer tokens) per item, in order.

        Raises :class:`BadItemError` naming the first item that cannot be scored (see :meth:`skip_reason`).
        """
        ...

    def skip_reason(self, item: ScoreItem) -> str | None:
        """Why ``item`` cannot be scored (``empty_answer``, ``prompt_too_long``), or None when it can."""
        ...


@dataclass(frozen=True)
class EncodedItem:
    """Token ids of one item: the templated prompt and the answer (scored part)."""

    prompt_ids: list[int]
    answer_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


class PromptEncoder:
    """Turns :class:`ScoreItem` into token ids, identically for every backend.

    Args:
        tokenizer: the generator's tokenizer (with a chat template).
        system_prompt: the system turn.
        max_passage_tokens: passages are cut to this many generator tokens.
        max_model_len: prompt + answer longer than this is a bad item (``prompt_too_long``).
    """

    def __init__(self, tokenizer: Any, system_prompt: str, max_passage_tokens: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_passage_tokens = max_passage_tokens
        self.max_model_len = max_model_len
        self._cut_cache: dict[str, str] = {}

    def cut_passage(self, passage: str) -> str:
        """``passage`` cut to at most ``max_passage_tokens`` generator tokens (whole text when shorter)."""
        cached = self._cut_cache.get(passage)
        if cached is not None:
            return cached
        out = cut_to_tokens(self.tokenizer, passage, self.max_passage_tokens)
        if len(self._cut_cache) > 50_000:
            self._cut_cache.clear()
        self._cut_cache[passage] = out
        return out

    def prompt_text(self, question: str, passage: str | None) -> str:
        """The templated prompt (system + user + assistant header) as text."""
        cut = None if passage is None else self.cut_passage(passage)
        messages = build_messages(self.system_prompt, question, cut)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, item: ScoreItem, index: int = 0) -> EncodedItem:
        """Token ids of ``item``; raises :class:`BadItemError` for an empty answer or an over-long prompt."""
        answer = item.answer.strip()
        if not answer:
            raise BadItemError(index, SKIP_EMPTY_ANSWER, "the gold answer is empty")
        prompt_ids = self.tokenizer(self.prompt_text(item.question, item.passage), add_special_tokens=False)[
            "input_ids"
        ]
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        enc = EncodedItem(list(prompt_ids), list(answer_ids))
        if enc.length > self.max_model_len:
            raise BadItemError(
                index,
                SKIP_TOO_LONG,
                f"{len(prompt_ids)} prompt + {len(answer_ids)} answer tokens > max_model_len {self.max_model_len} "
                f"(passage already cut to {self.max_passage_tokens} tokens)",
            )
        return enc

    def skip_reason(self, item: ScoreItem) -> str | None:
        try:
            self.encode(item)
        except BadItemError as e:
            return e.reason
        return None


class HFScorer:
    """Transformers scorer: batched, length-sorted, left-padded, logits only at answer positions.

    Args:
        generator: registry name, local path or hub id of the causal LM.
        system_prompt: the system turn of every prompt.
        dtype: ``auto`` (default: bf16 on GPU or a CPU with bf16 units, else fp32), ``bfloat16``, ``float32`` or
            ``float16`` (GPU).
        max_passage_tokens: passages are cut to this many generator tokens.
        batch_size: sequences per forward pass.
        max_model_len: prompt + answer longer than this is a bad item.
        device: ``cpu``/``cuda``; default: cuda when available.
    """

    def __init__(
        self,
        generator: str,
        system_prompt: str,
        dtype: str = "auto",
        max_passage_tokens: int = 256,
        batch_size: int = 16,
        max_model_len: int = 1024,
        device: str | None = None,
    ) -> None:
        import torch

        from uae_ray.models.registry import load_causal_lm, resolve_dtype

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.tokenizer = load_causal_lm(generator, self.dtype, self.device)
        self.encoder = PromptEncoder(self.tokenizer, system_prompt, max_passage_tokens, max_model_len)
        self.batch_size = batch_size
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.tokens_processed = 0  # prompt + answer tokens through the model (for tokens/s)

    def skip_reason(self, item: ScoreItem) -> str | None:
        return self.encoder.skip_reason(item)

    def answer_logprobs(self, items: list[ScoreItem]) -> list[tuple[float, int]]:
        """(mean log-prob over answer tokens, n answer tokens) per item, in input order."""
        encoded = [self.encoder.encode(it, i) for i, it in enumerate(items)]
        if not encoded:
            return []
        means = continuation_logprobs(self.model, self.pad_id, [e.prompt_ids for e in encoded],
                                      [e.answer_ids for e in encoded], batch_size=self.batch_size)
        self.tokens_processed += sum(e.length for e in encoded)
        return [(float(m), len(e.answer_ids)) for m, e in zip(means, encoded, strict=True)]


def make_scorer(cfg: LabelConfig) -> Scorer:
    """The scorer of ``cfg.backend`` with ``cfg``'s generator, prompt, dtype and limits."""
    system_prompt = system_prompt_for(cfg)
    if cfg.backend == "hf":
        return HFScorer(
            cfg.generator,
            system_prompt,
            dtype=cfg.dtype,
            max_passage_tokens=cfg.max_passage_tokens,
            batch_size=cfg.pool.batch_size,
            max_model_len=cfg.max_model_len,
        )
    if cfg.backend == "vllm":
        raise ValueError("backend vllm runs vLLM engines as a Ray Data LLM stage inside `uae-ray label` "
                         "(uae_ray.labeling.vllm_scorer); it has no in-process scorer: use backend hf here")
    raise ValueError(f"unknown backend {cfg.backend!r}: use hf or vllm")
