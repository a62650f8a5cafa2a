"""Causal-LM primitives shared by labeling (answer log-probs) and evaluation (UPR, RankGPT, generated answers).

- :func:`cut_to_tokens`: a passage cut to at most N generator tokens (the one passage cutter).
- :func:`chat_prompt_ids`: token ids of chat messages with the chat template and the generation prompt.
- :func:`continuation_logprobs`: mean log p(continuation | prompt) per pair, batched (the one scoring loop):
  length-sorted batches, left padding with ``position_ids = attention_mask.cumsum(-1) - 1``, ``logits_to_keep`` =
  longest continuation + 1 so the vocabulary head runs only where needed, log-softmax in float32.
- :func:`greedy_generate`: greedy continuations, batched with left padding.

Models only encode: prompts (what is asked) are built by the callers.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def cut_to_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut to at most ``max_tokens`` tokens of ``tokenizer`` (the whole text when it is shorter).

    The cut is decoded back to text (special tokens skipped), so re-tokenizing it may differ by a token or two at the
    cut.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and the generation prompt (no extra specials)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids) [n, longest] tensors of ``rows`` padded on the left."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def continuation_logprobs(
    model: Any, pad_id: int, prompts: list[list[int]], continuations: list[list[int]], *, batch_size: int = 8
) -> np.ndarray:
    """Mean log-probability of each continuation's tokens after its prompt, under a causal LM.

    Args:
        model: a causal LM (transformers; its device is used).
        pad_id: the token id used for left padding (masked out).
        prompts: token ids of each prompt.
        continuations: token ids scored after each prompt (each non-empty).
        batch_size: sequences per forward pass (batches are sorted by length: little padding).

    Returns:
        float32 array [n]: mean over each continuation's tokens of log p(token | prompt, earlier tokens).
    """
    import torch

    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations: pairs must align")
    empty = [i for i, c in enumerate(continuations) if not c]
    if empty:
        raise ValueError(f"continuation {empty[0]} is empty: nothing to score")
    out = np.zeros(len(prompts), dtype=np.float32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(continuations[i]))
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        n_cont = max(len(continuations[i]) for i in idx)
        ids, mask, pos = left_pad([prompts[i] + continuations[i] for i in idx], pad_id)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           logits_to_keep=n_cont + 1, use_cache=False).logits  # [b, n_cont + 1, vocab]
        # logits at position t predict token t+1: each row's continuation (its last c tokens) is predicted by the
        # n_cont positions before the last one
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [b, n_cont, vocab]
        targets = ids[:, ids.shape[1] - n_cont :].to(logp.device)
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        for row, i in enumerate(idx):
            out[i] = float(token_logp[row, n_cont - len(continuations[i]) :].mean())
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
        ids, mask, _ = left_pad([prompts[i] for i in idx], int(tokenizer.pad_token_id))
        with torch.inference_mode():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=int(tokenizer.pad_token_id))
        for row, i in enumerate(idx):
            outs[i] = tokenizer.decode(gen[row, ids.shape[1] :], skip_special_tokens=True).strip()
    return outs
