"""Prompt construction for utility labeling, shared by every scorer backend (hf, vllm).

The generator sees a chat: a per-dataset system prompt, then a user turn holding the (optional) context passage and the
question. The scorer applies the generator's chat template with the generation prompt, and scores the gold answer as
the assistant's reply (answer tokens only, not the closing end-of-turn token).

Presets (``LabelConfig.prompt``):

- ``extractive``: short-answer sets (SQuAD, MRQA): the reply is a short phrase, ideally copied from the context.
- ``qasper``: scientific papers: an evidence-based short answer or summary, Yes/No for yes/no questions.
- ``custom``: ``LabelConfig.system_prompt`` verbatim.

The user turn is ``"Context: {passage}\\n\\nQuestion: {question}"`` with a passage and ``"Question: {question}"``
without; both share the same system prompt, so the utility measures only what the passage adds.

The stored ``prompt_version`` (:func:`prompt_version_for`) names the preset and the configured version and ends with a
hash of everything that changes a label (system prompt, templates, answer aggregate, passage cut), so labels made under
different prompts never mix silently.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uae_ray.config import LabelConfig

PROMPTS: dict[str, str] = {
    "extractive": (
        "Answer the question using the context if it helps. "
        "Reply with a short phrase, copied from the context when possible."
    ),
    "qasper": (
        "You answer questions about a scientific paper. Use the context from the paper if it helps. "
        "Give a brief answer based on the evidence: a short phrase or a one-sentence summary, "
        "or Yes or No for a yes/no question."
    ),
}

USER_TEMPLATE_WITH_PASSAGE = "Context: {passage}\n\nQuestion: {question}"
USER_TEMPLATE_NO_PASSAGE = "Question: {question}"


def system_prompt_for(cfg: LabelConfig) -> str:
    """The system prompt of ``cfg``: a preset from :data:`PROMPTS`, or ``cfg.system_prompt`` for ``prompt=custom``."""
    if cfg.prompt == "custom":
        if not cfg.system_prompt:
            raise ValueError("prompt=custom needs system_prompt")
        return cfg.system_prompt
    try:
        return PROMPTS[cfg.prompt]
    except KeyError as e:
        raise ValueError(f"unknown prompt preset {cfg.prompt!r}; known: {sorted(PROMPTS)} or custom") from e


def build_messages(system_prompt: str, question: str, passage: str | None) -> list[dict[str, str]]:
    """Chat messages (system + user) for one question, with or without a context passage.

    Args:
        system_prompt: the system turn (see :func:`system_prompt_for`).
        question: the question text.
        passage: the context passage (already cut to the token budget), or None for the no-passage prompt.

    Returns:
        ``[{"role": "system", ...}, {"role": "user", ...}]``; the scorer applies the chat template.
    """
    if passage is None:
        user = USER_TEMPLATE_NO_PASSAGE.format(question=question.strip())
    else:
        user = USER_TEMPLATE_WITH_PASSAGE.format(passage=passage.strip(), question=question.strip())
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


def prompt_version_for(cfg: LabelConfig) -> str:
    """The ``prompt_version`` stored with every label, e.g. ``extractive-v1-max-1a2b3c4d``.

    The hash covers the system prompt, both user templates, the answer aggregate and the passage token budget.
    """
    key = "\x1f".join(
        [
            system_prompt_for(cfg),
            USER_TEMPLATE_WITH_PASSAGE,
            USER_TEMPLATE_NO_PASSAGE,
            cfg.answer_aggregate,
            str(cfg.max_passage_tokens),
        ]
    )
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
    return f"{cfg.prompt}-{cfg.prompt_version}-{cfg.answer_aggregate}-{digest}"
