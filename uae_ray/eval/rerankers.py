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

UPR_INSTRUCTION = "Please write a question based on this passage."
RANKGPT_SYSTEM = "You are RankGPT, an intelligent assistant that ranks passages by their relevance to a query."


def _cut(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def continuation_logprobs(
    model: Any, tokenizer: Any, prompts: list[list[int]], continuations: list[list[int]], *, batch_size: int = 8
) -> np.ndarray:
    """Mean log-probability of each continuation's tokens after its prompt.

    Args:
        model: a causal LM (transformers).
        tokenizer: its tokenizer (pad id used for left padding).
        prompts: token ids of each prompt.
        continuations: token ids scored after each prompt (non-empty).

    Returns:
        float32 array [n] of mean log-probs.
    """
    import torch

    out = np.zeros(len(prompts), dtype=np.float32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(continuations[i]))
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [prompts[i] + continuations[i] for i in idx]
        n_cont = max(len(continuations[i]) for i in idx)
        ids, mask, pos = _left_pad(rows, int(tokenizer.pad_token_id))
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           logits_to_keep=n_cont + 1, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = ids[:, ids.shape[1] - n_cont :].to(logp.device)
        tok = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        for row, i in enumerate(idx):
            c = len(continuations[i])
            out[i] = float(tok[row, n_cont - c :].mean())
    return out


def greedy_generate(model: Any, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: int,
                    batch_size: int = 8) -> list[str]:
    """Greedy continuations (decoded, stripped) of each prompt, batched with left padding."""
    import torch

    outs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask, _ = _left_pad([prompts[i] for i in idx], int(tokenizer.pad_token_id))
        with torch.inference_mode():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=int(tokenizer.pad_token_id))
        for row, i in enumerate(idx):
            outs[i] = tokenizer.decode(gen[row, ids.shape[1] :], skip_special_tokens=True).strip()
    return outs


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
        cuts = [_cut(self.tokenizer, p, self.max_passage_tokens) for p in passages]
        prompts = [
            _chat_ids(self.tokenizer, [{"role": "user", "content": f"Passage: {c}\n\n{UPR_INSTRUCTION}"}])
            for c in cuts
        ]
        return continuation_logprobs(self.model, self.tokenizer, prompts, [q_ids] * len(prompts),
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
        lines = "\n".join(f"[{i + 1}] {_cut(self.tokenizer, p, self.max_passage_tokens)}" for i, p in
                          enumerate(passages))
        user = (
            f"I will give you {n} passages, each with an identifier []. Rank them by relevance to the query.\n\n"
            f"{lines}\n\nQuery: {question.strip()}\n"
            f"Rank the {n} passages above from most to least relevant to the query, using their identifiers, "
            f"in the format [1] > [2]. Answer only with the ranking."
        )
        return _chat_ids(self.tokenizer, [{"role": "system", "content": RANKGPT_SYSTEM},
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
