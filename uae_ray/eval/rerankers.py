"""LLM re-rankers and greedy answers with the generator (the slow baselines UAE is compared against).

- :class:`QueryLikelihoodReranker` (UPR, Sachan et al. 2022): score(q, d) = mean log p(q tokens | prompt(d)), the
  question scored as the assistant's reply to "write a question for this passage". One batched forward per query.
- :class:`ListwiseReranker` (RankGPT, Sun et al. 2023): the generator reads a numbered window of passages and writes a
  permutation "[2] > [1] > ..."; a sliding window (back to front) covers more passages than fit one prompt. The
  output is parsed robustly (any integers in range, duplicates dropped, missing ones appended in their old order);
  windows whose output holds no valid id, or only some ids, are counted.
- :func:`generate_answers`: the generator's greedy answer given a context, with the labeling prompt.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from uae_ray.models.lm import chat_prompt_ids, continuation_logprobs, cut_to_tokens, greedy_generate

UPR_INSTRUCTION = "Please write a question based on this passage."
RANKGPT_SYSTEM = "You are RankGPT, an intelligent assistant that ranks passages by their relevance to a query."


class QueryLikelihoodReranker:
    """UPR: re-rank passages by mean log p(question | passage) under the generator.

    Args:
        model: causal LM; tokenizer: its tokenizer (with a chat template).
        max_passage_tokens: passages are cut to this many generator tokens.
        batch_size: sequences per forward pass.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_passage_tokens: int = 256, batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_passage_tokens = max_passage_tokens
        self.batch_size = batch_size

    def scores(self, question: str, passages: list[str]) -> np.ndarray:
        """float32 [len(passages)]: mean log p(question tokens | passage prompt)."""
        if not passages:
            return np.zeros(0, dtype=np.float32)
        q_ids = list(self.tokenizer(question.strip(), add_special_tokens=False)["input_ids"])
        cuts = [cut_to_tokens(self.tokenizer, p, self.max_passage_tokens) for p in passages]
        prompts = [
            chat_prompt_ids(self.tokenizer, [{"role": "user", "content": f"Passage: {c}\n\n{UPR_INSTRUCTION}"}])
            for c in cuts
        ]
        return continuation_logprobs(self.model, int(self.tokenizer.pad_token_id), prompts, [q_ids] * len(prompts),
                                     batch_size=self.batch_size)

    def rerank(self, question: str, passages: list[str]) -> list[int]:
        """Indices into ``passages``, best first (stable for ties)."""
        s = self.scores(question, passages)
        return [int(i) for i in np.argsort(-s, kind="stable")]


_INT = re.compile(r"\d+")


def parse_permutation(text: str, n: int) -> tuple[list[int], str]:
    """Parse a listwise answer like ``"[2] > [1] > [3]"`` into 0-based indices covering all ``n`` items.

    Integers outside 1..n and repeats are dropped; items never mentioned follow in their original order.

    Returns:
        (permutation of range(n), status): ``ok`` (all n ids given), ``partial`` (some) or ``failed`` (none).
    """
    seen: list[int] = []
    for m in _INT.findall(text):
        v = int(m) - 1
        if 0 <= v < n and v not in seen:
            seen.append(v)
    status = "ok" if len(seen) == n else ("partial" if seen else "failed")
    return seen + [i for i in range(n) if i not in seen], status


@dataclass
class ListwiseReranker:
    """RankGPT-style listwise permutation with a sliding window over the candidates.

    Args:
        model: causal LM; tokenizer: its tokenizer (with a chat template).
        window: passages per prompt; step: how far the window moves (back to front).
        max_passage_tokens: each passage is cut to this many tokens (the prompt holds ``window`` of them).
        max_new_tokens: budget for the permutation text (about 4 tokens per id).
    """

    model: Any
    tokenizer: Any
    window: int = 5
    step: int = 3
    max_passage_tokens: int = 64
    max_new_tokens: int = 40
    parse_counts: Counter = field(default_factory=Counter)

    def _prompt(self, question: str, passages: list[str]) -> list[int]:
        n = len(passages)
        lines = "\n".join(f"[{i + 1}] {cut_to_tokens(self.tokenizer, p, self.max_passage_tokens)}"
                          for i, p in enumerate(passages))
        user = (
            f"I will give you {n} passages, each with an identifier []. Rank them by relevance to the query.\n\n"
            f"{lines}\n\nQuery: {question.strip()}\n"
            f"Rank the {n} passages above from most to least relevant to the query, using their identifiers, "
            f"in the format [1] > [2]. Answer only with the ranking."
        )
        return chat_prompt_ids(self.tokenizer, [{"role": "system", "content": RANKGPT_SYSTEM},
                                          {"role": "user", "content": user}])

    def _permute(self, question: str, passages: list[str]) -> list[int]:
        text = greedy_generate(self.model, self.tokenizer, [self._prompt(question, passages)],
                               max_new_tokens=self.max_new_tokens)[0]
        perm, status = parse_permutation(text, len(passages))
        self.parse_counts[status] += 1
        return perm

    def rerank(self, question: str, passages: list[str]) -> list[int]:
        """Indices into ``passages``, best first, after sliding the window from the back to the front."""
        order = list(range(len(passages)))
        if len(order) <= 1:
            return order
        end = len(order)
        while True:
            start = max(0, end - self.window)
            chunk = order[start:end]
            perm = self._permute(question, [passages[i] for i in chunk])
            order[start:end] = [chunk[j] for j in perm]
            if start == 0:
                return order
            end -= self.step
