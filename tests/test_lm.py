"""The shared LM primitives (uae_ray.models.lm) and both of their call sites: labeling's HFScorer and UPR.

Both call sites must give the numbers of an independent reference: one unpadded full forward pass per item."""

from __future__ import annotations

import pytest

from uae_ray.models.lm import chat_prompt_ids, continuation_logprobs, cut_to_tokens

GEN = "smollm2-135m-instruct"
MOON = (
    "Neil Armstrong was an American astronaut. On 20 July 1969, as commander of Apollo 11, he became the first "
    "person to walk on the Moon."
)
PARIS = "Paris is the capital and largest city of France, on the river Seine."


@pytest.fixture(scope="module")
def lm32():
    from uae_ray.models.registry import load_causal_lm

    return load_causal_lm(GEN, "float32")


def _reference(model, prompt: list[int], cont: list[int]) -> float:
    """mean log p(cont | prompt) from one unpadded forward over the whole sequence (all logits kept)."""
    import torch

    ids = torch.tensor([prompt + cont])
    with torch.inference_mode():
        logp = model(ids).logits[0].float().log_softmax(-1)
    t, c = ids.shape[1], len(cont)
    return logp[t - c - 1 : t - 1].gather(-1, ids[0, t - c :].unsqueeze(-1)).mean().item()


def test_cut_to_tokens_keeps_short_text_and_cuts_long_text():
    from uae_ray.models.registry import load_tokenizer

    tok = load_tokenizer(GEN)
    assert cut_to_tokens(tok, PARIS, 1000) == PARIS
    cut = cut_to_tokens(tok, MOON, 8)
    assert MOON.startswith(cut) and cut != MOON
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) == 8


@pytest.mark.slow
def test_continuation_logprobs_batched_equals_unbatched(lm32):
    model, tok = lm32
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": t}]) for t in (MOON, PARIS, MOON + " " + PARIS)]
    conts = [tok(a, add_special_tokens=False)["input_ids"] for a in ("Neil Armstrong", "Paris", "20 July 1969")]
    got = continuation_logprobs(model, int(tok.pad_token_id), prompts, conts, batch_size=2)
    assert got.shape == (3,) and str(got.dtype) == "float32"
    for g, p, c in zip(got, prompts, conts, strict=True):
        assert g == pytest.approx(_reference(model, p, c), abs=2e-3)
    with pytest.raises(ValueError, match="continuation 1 is empty"):
        continuation_logprobs(model, int(tok.pad_token_id), prompts[:2], [conts[0], []])


@pytest.mark.slow
def test_upr_and_hf_scorer_share_the_cutter_and_the_scoring(lm32):
    """UPR's scores and the labeling scorer's answer log-probs equal the unbatched reference on their own prompts,
    and both cut passages with the one cutter."""
    from uae_ray.eval.rerankers import UPR_INSTRUCTION, QueryLikelihoodReranker
    from uae_ray.labeling.prompts import PROMPTS
    from uae_ray.labeling.scorers import HFScorer, ScoreItem

    model, tok = lm32
    question = "Who first walked on the Moon?"
    passages = [MOON, PARIS, " ".join([MOON] * 4)]
    upr = QueryLikelihoodReranker(model, tok, max_passage_tokens=24, batch_size=2).scores(question, passages)
    q_ids = tok(question, add_special_tokens=False)["input_ids"]
    for s, p in zip(upr, passages, strict=True):
        cut = cut_to_tokens(tok, p, 24)
        prompt = chat_prompt_ids(tok, [{"role": "user", "content": f"Passage: {cut}\n\n{UPR_INSTRUCTION}"}])
        assert s == pytest.approx(_reference(model, prompt, q_ids), abs=2e-3)

    scorer = HFScorer(GEN, PROMPTS["extractive"], dtype="float32", batch_size=2, max_passage_tokens=24)
    assert scorer.model is model  # the same cached generator
    assert scorer.encoder.cut_passage(passages[2]) == cut_to_tokens(tok, passages[2], 24)
    items = [ScoreItem(question, "Neil Armstrong", p) for p in passages] + [ScoreItem(question, "Neil", None)]
    for (lp, n), item in zip(scorer.answer_logprobs(items), items, strict=True):
        enc = scorer.encoder.encode(item)
        assert n == len(enc.answer_ids)
        assert lp == pytest.approx(_reference(model, enc.prompt_ids, enc.answer_ids), abs=2e-3)
