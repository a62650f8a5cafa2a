"""Labeling: prompts, the HF scorer against an unbatched forward pass, answer aggregates, skips, label_pairs_local."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from uae_ray.config import ConfigError, LabelConfig, build_config
from uae_ray.data.schema import UTILITIES_SCHEMA, UTILITIES_VIEW_SCHEMA
from uae_ray.labeling.fingerprint import baseline_fingerprint, pair_fingerprint, settings_key
from uae_ray.labeling.pipeline import aggregate_answers, label_pairs_local, label_pairs_with_skips, usable_answers
from uae_ray.labeling.prompts import PROMPTS, build_messages, prompt_version_for, system_prompt_for
from uae_ray.labeling.scorers import SKIP_EMPTY_ANSWER, SKIP_TOO_LONG, HFScorer, ScoreItem

GEN = "smollm2-135m-instruct"
MOON = (
    "Neil Armstrong was an American astronaut. On 20 July 1969, as commander of Apollo 11, he became the first "
    "person to walk on the Moon."
)
PARIS = "Paris is the capital and largest city of France, on the river Seine."
RIVER = "The Nile is a major river in northeastern Africa and flows into the Mediterranean Sea."


def test_messages_and_system_prompts() -> None:
    msgs = build_messages("SYS", " Who? ", "  a passage ")
    assert msgs == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Context: a passage\n\nQuestion: Who?"},
    ]
    assert build_messages("SYS", "Who?", None)[1]["content"] == "Question: Who?"
    assert system_prompt_for(LabelConfig(prompt="qasper")) == PROMPTS["qasper"]
    assert system_prompt_for(LabelConfig(prompt="custom", system_prompt="Be terse.")) == "Be terse."
    # Every setting that changes a label changes the stored prompt_version.
    versions = {
        prompt_version_for(LabelConfig()),
        prompt_version_for(LabelConfig(prompt="qasper")),
        prompt_version_for(LabelConfig(answer_aggregate="mean")),
        prompt_version_for(LabelConfig(max_passage_tokens=128)),
        prompt_version_for(LabelConfig(prompt_version="v2")),
        prompt_version_for(LabelConfig(prompt="custom", system_prompt="Be terse.")),
    }
    assert len(versions) == 6
    assert prompt_version_for(LabelConfig()).startswith("extractive-v1-max-")


def test_settings_key_covers_exactly_the_settings_that_change_numbers() -> None:
    base = LabelConfig()
    key = settings_key(base, "float32")
    changed = {
        "dtype": settings_key(base, "bfloat16"),
        "backend": settings_key(LabelConfig(backend="vllm"), "float32"),
        "max_model_len": settings_key(LabelConfig(max_model_len=512), "float32"),
        "max_passage_tokens": settings_key(LabelConfig(max_passage_tokens=128), "float32"),
        "answer_aggregate": settings_key(LabelConfig(answer_aggregate="mean"), "float32"),
        "prompt": settings_key(LabelConfig(prompt="qasper"), "float32"),
        "system_prompt": settings_key(LabelConfig(prompt="custom", system_prompt="Be terse."), "float32"),
        "prompt_version": settings_key(LabelConfig(prompt_version="v2"), "float32"),
        "generator": settings_key(LabelConfig(generator="other-lm"), "float32"),
    }
    assert key not in changed.values() and len(set(changed.values())) == len(changed)
    same = LabelConfig(pool={"min_size": 2, "max_size": 4, "batch_size": 3, "num_cpus": 2}, rows_per_part=7,
                       rows_per_batch=5, splits=["train"], enable_prefix_caching=False, gpu_memory_utilization=0.5)
    assert settings_key(same, "float32") == key
    with pytest.raises(ValueError, match="resolve 'auto'"):
        settings_key(base, "auto")
    # pair keys: content, never positions
    b = baseline_fingerprint(key, "Who?", ["Ada"])
    assert b != baseline_fingerprint(key, "Who?", ["Ada", "Lind"]) != baseline_fingerprint(key, "Who? ", ["Ada"])
    assert pair_fingerprint(b, "text") != pair_fingerprint(b, "text.")
    assert pair_fingerprint(b, "text") != pair_fingerprint(baseline_fingerprint(changed["dtype"], "Who?", ["Ada"]),
                                                           "text")


def test_label_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="system_prompt"):
        build_config(LabelConfig, {"prompt": "custom"}, source="t.yaml")
    with pytest.raises(ConfigError, match="only used with prompt=custom"):
        build_config(LabelConfig, {"prompt": "qasper", "system_prompt": "x"}, source="t.yaml")
    with pytest.raises(ConfigError, match="answer_aggregate"):
        build_config(LabelConfig, {"answer_aggregate": "median"}, source="t.yaml")


def test_answer_aggregates_by_hand() -> None:
    with_p = [(-1.0, 2), (-0.5, 4), (-2.0, 3)]
    without = [(-3.0, 2), (-1.0, 4), (-2.5, 3)]  # utilities 2.0, 0.5, 0.5
    assert aggregate_answers(with_p, without, "first") == (-1.0, -3.0, 2)
    assert aggregate_answers(with_p, without, "max") == (-1.0, -3.0, 2)
    lw, lo, n = aggregate_answers(with_p, without, "mean")
    assert lw == pytest.approx(-3.5 / 3) and lo == pytest.approx(-6.5 / 3) and n == 3
    assert lw - lo == pytest.approx(1.0)  # mean of the per-answer utilities
    assert usable_answers([" a ", "", "  ", "b"], "max") == ["a", "b"]
    assert usable_answers(["", "b", "c"], "first") == ["b"]
    with pytest.raises(ValueError, match="aggregate"):
        usable_answers(["a"], "median")


@pytest.fixture(scope="module")
def scorer32() -> HFScorer:
    return HFScorer(GEN, PROMPTS["extractive"], dtype="float32", batch_size=3, max_passage_tokens=48)


@pytest.mark.slow
def test_hf_scorer_batched_equals_unbatched_full_forward(scorer32: HFScorer) -> None:
    """Length-sorted left-padded batches with logits_to_keep give the same numbers as one full pass per item."""
    import torch

    items = [
        ScoreItem("Who first walked on the Moon?", "Neil Armstrong", MOON),
        ScoreItem("Who first walked on the Moon?", "Neil Armstrong", None),
        ScoreItem("Which city is the capital of France?", "Paris", PARIS),
        ScoreItem("When did Apollo 11 land?", "20 July 1969", MOON),
        ScoreItem("Where does the Nile flow into?", "the Mediterranean Sea", RIVER + " " + MOON),
    ]
    got = scorer32.answer_logprobs(items)
    for item, (lp, n) in zip(items, got, strict=True):
        enc = scorer32.encoder.encode(item)
        ids = torch.tensor([enc.prompt_ids + enc.answer_ids])
        with torch.inference_mode():
            logp = scorer32.model(ids).logits[0].float().log_softmax(-1)
        a, t = len(enc.answer_ids), ids.shape[1]
        ref = logp[t - a - 1 : t - 1].gather(-1, ids[0, t - a :].unsqueeze(-1)).mean().item()
        assert n == a == len(scorer32.tokenizer(item.answer.strip(), add_special_tokens=False)["input_ids"])
        assert lp == pytest.approx(ref, abs=2e-3)
    # The end-of-turn token is not scored: the answer tokens are exactly the answer's own tokens.
    assert scorer32.tokenizer.eos_token_id not in scorer32.encoder.encode(items[0]).answer_ids


@pytest.mark.slow
def test_passage_cut_and_bad_items(scorer32: HFScorer) -> None:
    long_passage = " ".join([MOON] * 20)
    cut = scorer32.encoder.cut_passage(long_passage)
    assert len(scorer32.tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 48 + 2
    assert scorer32.skip_reason(ScoreItem("q?", "  ", MOON)) == SKIP_EMPTY_ANSWER
    tiny = HFScorer(GEN, PROMPTS["extractive"], dtype="float32", max_model_len=64)
    assert tiny.skip_reason(ScoreItem("Who first walked on the Moon?", "Neil Armstrong", None)) is None
    assert tiny.skip_reason(ScoreItem("Who first walked on the Moon?", "Neil Armstrong", MOON)) == SKIP_TOO_LONG
    with pytest.raises(ValueError, match="item 1: prompt_too_long"):
        tiny.answer_logprobs([ScoreItem("Who?", "Neil", None), ScoreItem("Who?", "Neil", MOON)])


class CountingScorer:
    """The real HF scorer, counting the items it is asked to score with and without a passage."""

    def __init__(self, inner: HFScorer) -> None:
        self.inner = inner
        self.no_passage = 0
        self.with_passage = 0

    def skip_reason(self, item: ScoreItem) -> str | None:
        return self.inner.skip_reason(item)

    def answer_logprobs(self, items: list[ScoreItem]) -> list[tuple[float, int]]:
        self.no_passage += sum(it.passage is None for it in items)
        self.with_passage += sum(it.passage is not None for it in items)
        return self.inner.answer_logprobs(items)


def _toy_tables() -> tuple[pa.Table, pa.Table]:
    queries = pa.table(
        {
            "qid": ["q1", "q2", "q3"],
            "question": ["Who first walked on the Moon?", "Which city is the capital of France?", "Anything?"],
            "answers": [["Neil Armstrong", "Armstrong"], ["Paris"], ["", "  "]],
        }
    )
    passages = {"moon": MOON, "paris": PARIS, "nile": RIVER}
    rows = [("q1", "moon"), ("q1", "paris"), ("q1", "nile"), ("q2", "paris"), ("q2", "moon"), ("q3", "nile")]
    pairs = pa.table(
        {"qid": [q for q, _ in rows], "pid": [p for _, p in rows], "text": [passages[p] for _, p in rows]}
    )
    return queries, pairs


@pytest.mark.slow
def test_label_pairs_local_schema_skips_and_once_per_answer(scorer32: HFScorer) -> None:
    queries, pairs = _toy_tables()
    counting = CountingScorer(scorer32)
    res = label_pairs_with_skips(counting, queries, pairs, aggregate="max", generator=GEN, prompt_version="t")
    out = res.labeled
    assert out.schema == UTILITIES_VIEW_SCHEMA
    assert out.num_rows == 5 and res.skipped.num_rows == 1
    skip = res.skipped.to_pylist()[0]
    assert skip | {"fingerprint": None} == {
        "qid": "q3", "pid": "nile", "reason": SKIP_EMPTY_ANSWER, "generator": GEN, "prompt_version": "t",
        "fingerprint": None,
    }
    assert skip["fingerprint"] == pair_fingerprint(baseline_fingerprint("", "Anything?", []), RIVER)
    # q1 and q2 both read "paris": same passage, other question and answers -> other keys
    assert len(set(out.column("fingerprint").to_pylist())) == 5
    # No-passage term once per (query, usable answer): q1 has 2 answers, q2 one, q3 none.
    assert counting.no_passage == 3
    assert counting.with_passage == 3 * 2 + 2 * 1
    d = out.to_pydict()
    for lw, lo, u in zip(d["logp_with"], d["logp_without"], d["utility"], strict=True):
        assert u == np.float32(np.float32(lw) - np.float32(lo))
    util = {(q, p): u for q, p, u in zip(d["qid"], d["pid"], d["utility"], strict=True)}
    assert util[("q1", "moon")] > max(util[("q1", "paris")], util[("q1", "nile")])
    assert util[("q2", "paris")] > util[("q2", "moon")]
    assert set(d["generator"]) == {GEN} and set(d["prompt_version"]) == {"t"}
    # The public in-process entry point returns the same labeled rows.
    again = label_pairs_local(scorer32, queries, pairs, aggregate="max", generator=GEN, prompt_version="t")
    assert again.schema == UTILITIES_SCHEMA
    assert again.column("utility").to_pylist() == pytest.approx(d["utility"], abs=1e-6)


@pytest.mark.slow
def test_aggregates_relate_as_documented(scorer32: HFScorer) -> None:
    queries, pairs = _toy_tables()
    got = {
        agg: label_pairs_local(scorer32, queries, pairs, aggregate=agg, generator=GEN, prompt_version=agg)
        for agg in ("first", "max", "mean")
    }
    per_answer = []
    for answer in ("Neil Armstrong", "Armstrong"):
        q = queries.slice(0, 1).set_column(2, "answers", pa.array([[answer]]))
        t = label_pairs_local(scorer32, q, pairs.slice(0, 3), aggregate="first", generator=GEN, prompt_version="x")
        per_answer.append(t.column("utility").to_numpy())
    per_answer_arr = np.stack(per_answer)  # [answers, 3 pairs of q1]
    first = got["first"].column("utility").to_numpy()[:3]
    mx = got["max"].column("utility").to_numpy()[:3]
    mean = got["mean"].column("utility").to_numpy()[:3]
    np.testing.assert_allclose(first, per_answer_arr[0], atol=1e-5)
    np.testing.assert_allclose(mx, per_answer_arr.max(0), atol=1e-5)
    np.testing.assert_allclose(mean, per_answer_arr.mean(0), atol=1e-5)
    # first scores only the first answer: its stored token count is that answer's.
    assert got["first"].column("n_answer_tokens").to_pylist()[0] == len(
        scorer32.tokenizer("Neil Armstrong", add_special_tokens=False)["input_ids"]
    )
    assert not any(math.isnan(x) for x in got["mean"].column("utility").to_pylist())


def _budget_queries(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.table({"qid": [q for q, _, _ in rows], "doc_id": [d for _, d, _ in rows],
                     "split": [s for _, _, s in rows]})


def _kept(queries: pa.Table, corpus_docs: list[str], cfg: LabelConfig) -> list[str]:
    from uae_ray.stages.label import budget_mask

    return queries.filter(budget_mask(queries, corpus_docs, cfg))["qid"].to_pylist()


def test_budget_keeps_the_first_documents_of_each_split_in_prepare_order() -> None:
    # prepare wrote the corpus in input order: d2, d0, d1 (train), e1, e0 (dev); d3 has no passage: it comes after
    corpus_docs = ["d2", "d2", "d0", "d1", "e1", "e0", "e0"]
    queries = _budget_queries([("q0", "d0", "train"), ("q1", "d1", "train"), ("q2", "d0", "train"),
                               ("q3", "d2", "train"), ("q4", "d3", "train"), ("q5", "e0", "dev"),
                               ("q6", "e1", "dev")])
    # one N for every split: documents (not queries) are counted, every query of a kept document stays
    assert _kept(queries, corpus_docs, LabelConfig(max_docs_per_split=2)) == ["q0", "q2", "q3", "q5", "q6"]
    assert _kept(queries, corpus_docs, LabelConfig(max_docs_per_split=1)) == ["q3", "q6"]
    assert _kept(queries, corpus_docs, LabelConfig(max_docs_per_split=3)) == ["q0", "q1", "q2", "q3", "q5", "q6"]
    # a cap per split; a split the dict leaves out is not capped
    assert _kept(queries, corpus_docs, LabelConfig(max_docs_per_split={"train": 1})) == ["q3", "q5", "q6"]
    assert _kept(queries, corpus_docs, LabelConfig(max_docs_per_split={"dev": 1, "test": 1})) == [
        "q0", "q1", "q2", "q3", "q4", "q6"]
    # None, or a cap above the documents there are: everything
    everything = queries["qid"].to_pylist()
    assert _kept(queries, corpus_docs, LabelConfig()) == everything
    assert _kept(queries, corpus_docs, LabelConfig(max_docs_per_split=100)) == everything
    # the order is the corpus's, not the queries' row order: shuffled rows keep the same documents
    shuffled = queries.take(pa.array([6, 4, 1, 0, 5, 3, 2]))
    assert sorted(_kept(shuffled, corpus_docs, LabelConfig(max_docs_per_split=2))) == ["q0", "q2", "q3", "q5", "q6"]


def test_budget_documents_without_passages_follow_in_query_order() -> None:
    queries = _budget_queries([("q0", "x9", "train"), ("q1", "x1", "train"), ("q2", "d0", "train"),
                               ("q3", "x9", "train")])
    assert _kept(queries, ["d0"], LabelConfig(max_docs_per_split=1)) == ["q2"]
    assert _kept(queries, ["d0"], LabelConfig(max_docs_per_split=2)) == ["q0", "q2", "q3"]  # x9 before x1
    assert _kept(queries, [], LabelConfig(max_docs_per_split=1)) == ["q0", "q3"]
    assert _kept(_budget_queries([]), [], LabelConfig(max_docs_per_split=1)) == []


def test_budget_config_is_positive_per_split() -> None:
    assert LabelConfig(max_docs_per_split={"train": 5}).doc_cap("train") == 5
    assert LabelConfig(max_docs_per_split={"train": 5}).doc_cap("dev") is None
    assert LabelConfig(max_docs_per_split=3).doc_cap("test") == 3
    for bad in (0, {"train": 0}, {"validation": 3}):
        with pytest.raises(ConfigError, match="max_docs_per_split"):
            build_config(LabelConfig, {"max_docs_per_split": bad}, source="t.yaml")
