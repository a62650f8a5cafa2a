"""Mining: scope choice, FAISS search, gold insertion, reward mix, answer-aware mining, and the mine stage on a real Ray
cluster."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from uae_ray.config import MineConfig
from uae_ray.data.schema import CANDIDATES, CANDIDATES_SCHEMA, CORPUS, CORPUS_SCHEMA, QUERIES, QUERIES_SCHEMA
from uae_ray.mining import (
    Pool,
    add_to_pool,
    answer_bm25_top,
    decide_scope,
    ensure_gold,
    mix_reward,
    search_ip,
    zscore,
)
from uae_ray.runtime import RunDir


def test_decide_scope() -> None:
    assert decide_scope(["a", "a", "b", "b", "c"], "auto") == "document"
    assert decide_scope(["a", "b", "c", "c"], "auto") == "corpus"  # median document has one passage
    assert decide_scope(["a"], "document") == "document"
    with pytest.raises(ValueError, match="scope"):
        decide_scope(["a"], "paper")


def test_search_ip_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    p = rng.normal(size=(50, 16)).astype(np.float32)
    q = rng.normal(size=(4, 16)).astype(np.float32)
    scores, idx = search_ip(p, q, 5)
    ref = q @ p.T
    np.testing.assert_array_equal(idx, np.argsort(-ref, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(ref, idx, 1), rtol=1e-5)
    assert search_ip(p[:3], q, 10)[1].shape == (4, 3)  # k capped at the number of passages


def test_ensure_gold_replaces_lowest_and_resorts() -> None:
    pool = Pool(np.array([4, 2, 9]), np.array([0.9, 0.8, 0.7], np.float32))
    assert ensure_gold(pool, [2], [0.8]) is pool  # already there: unchanged
    out = ensure_gold(pool, [7], [0.85])
    assert out.rows.tolist() == [4, 7, 2] and out.scores.tolist() == pytest.approx([0.9, 0.85, 0.8])
    low = ensure_gold(pool, [7, 5], [0.1, 0.2])  # both below everything: they take the last ranks
    assert low.rows.tolist() == [4, 5, 7]
    grow = ensure_gold(Pool(np.array([1]), np.array([0.5], np.float32)), [3, 6], [0.2, 0.3])
    assert sorted(grow.rows.tolist()) == [3, 6]  # golds never evicted: 2 golds need 2 slots
    assert len(ensure_gold(Pool(np.array([1]), np.array([0.5], np.float32)), [3, 6], [0.6, 0.2]).rows) == 2


def test_mix_reward_by_hand() -> None:
    rows = np.array([10, 11, 12, 13])
    base = np.array([0.9, 0.8, 0.7, 0.6])
    teacher = {12: 5.0, 11: 1.0, 10: 0.0}  # 13 has no teacher score: gets the lowest teacher z
    assert mix_reward(rows, base, teacher, 0.0, 4).rows.tolist() == [10, 11, 12, 13]
    assert mix_reward(rows, base, teacher, 1.0, 2).rows.tolist() == [12, 11]
    mixed = mix_reward(rows, base, teacher, 0.5, 4)
    zb = zscore(base)
    zt = zscore(np.array([0.0, 1.0, 5.0]))
    expect = 0.5 * zb + 0.5 * np.array([*zt, zt.min()])
    np.testing.assert_allclose(mixed.scores, np.sort(expect)[::-1], rtol=1e-5)


def test_answer_bm25_top_only_passages_sharing_an_answer_term() -> None:
    texts = ["Apollo 11 landed on the Moon in July 1969.", "Neil Armstrong walked on the Moon.",
             "Pasta is boiled in salted water.", "In July the Moon was full; July 1969 was busy."]
    hits = answer_bm25_top(texts, ["july 1969", "neil armstrong", "", "zebra", "the"], 3)
    assert set(hits[0]) == {0, 3} and len(hits[0]) == 2  # the other two share no answer term
    assert hits[1] == [1]
    assert hits[2] == [] and hits[3] == []  # no answer; an answer no passage contains
    assert hits[4] == []  # a stopword alone matches nothing
    assert answer_bm25_top(texts, ["moon"], 1) == [[1]]  # k caps; the shortest passage with the term first
    assert answer_bm25_top([], ["moon"], 2) == [[]]


def test_add_to_pool_grows_and_resorts_without_duplicates() -> None:
    pool = Pool(np.array([4, 2]), np.array([0.9, 0.5], np.float32))
    assert add_to_pool(pool, [2], [0.5]) is pool  # nothing new: unchanged
    out = add_to_pool(pool, [7, 2, 8], [0.7, 0.5, 0.1])
    assert out.rows.tolist() == [4, 7, 2, 8] and out.scores.tolist() == pytest.approx([0.9, 0.7, 0.5, 0.1])


def test_answer_passages_do_not_combine_with_the_reward_mix() -> None:
    assert MineConfig(answer_passages=2).answer_splits == ["train"]
    with pytest.raises(ValueError, match="answer_passages and reward_weight"):
        MineConfig(answer_passages=2, reward_weight=0.5)


TOPICS = {
    "moon": ["Apollo 11 landed on the Moon in July 1969.", "Neil Armstrong was the first person on the Moon.",
             "The Moon orbits the Earth every 27 days.", "Lunar samples were brought back to Earth."],
    "cook": ["Bread is baked from flour, water and yeast.", "Pasta is boiled in salted water.",
             "An omelette is made from beaten eggs.", "Rice is steamed until soft."],
    "bird": ["Penguins cannot fly but swim well.", "Eagles build nests on cliffs.",
             "Hummingbirds hover while feeding on nectar.", "Owls hunt at night."],
}
QUESTIONS = {
    "moon": ("Who was the first person on the Moon?", 1, "train"),
    "cook": ("How do you make an omelette?", 2, "dev"),
    "bird": ("Which birds hunt at night?", 3, "train"),
}


def write_run(tmp_path, *, one_passage_docs: bool) -> RunDir:
    """A tiny corpus: 3 documents x 4 passages (document scope) or 12 single-passage documents (corpus scope)."""
    rd = RunDir(tmp_path / "run")
    rows = []
    for doc, texts in TOPICS.items():
        for i, t in enumerate(texts):
            rows.append({"pid": f"{doc}#{i}", "doc_id": f"{doc}{i}" if one_passage_docs else doc, "title": doc,
                         "text": t, "n_tokens": len(t.split())})
    rd.write_table(CORPUS, pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA))
    qs = []
    for doc, (question, gold, split) in QUESTIONS.items():
        qs.append({"qid": f"q-{doc}", "doc_id": f"{doc}{gold}" if one_passage_docs else doc, "question": question,
                   "answers": ["x"], "gold_pids": [f"{doc}#{gold}"], "split": split})
    rd.write_table(QUERIES, pa.Table.from_pylist(qs, schema=QUERIES_SCHEMA))
    return rd


@pytest.mark.slow
def test_mine_document_scope_gold_and_rerun(ray_session, tmp_path) -> None:
    from uae_ray.stages import mine

    rd = write_run(tmp_path, one_passage_docs=False)
    cfg = MineConfig(pool_size=2, pool={"min_size": 1, "max_size": 1, "batch_size": 4})
    report = mine.run(cfg, rd)
    assert report["scope"] == "document" and report["queries_with_pool"] == 3
    cands = rd.read_table(CANDIDATES)
    assert cands.schema == CANDIDATES_SCHEMA
    for row in cands.to_pylist():  # pools stay inside the query's own document
        assert row["pid"].split("#")[0] == row["qid"].removeprefix("q-")
    per_q = {q: cands.filter(pc.equal(cands["qid"], q)).to_pylist() for q in ("q-moon", "q-cook", "q-bird")}
    for q, rows in per_q.items():
        assert [r["rank"] for r in rows] == list(range(len(rows))) and len(rows) == 2
        assert sum(r["is_gold"] for r in rows) == 1, q
        scores = [r["base_score"] for r in rows]
        assert scores == sorted(scores, reverse=True)
    assert per_q["q-moon"][0]["pid"] == "moon#1" and per_q["q-moon"][0]["is_gold"]
    # base_score is the real cosine under the encoder
    from uae_ray.models.encoder import encode, load_encoder

    model = load_encoder("all-minilm-l6-v2")
    qv = encode(model, ["Who was the first person on the Moon?"])
    pv = encode(model, [TOPICS["moon"][1]])
    assert per_q["q-moon"][0]["base_score"] == pytest.approx(float(qv[0] @ pv[0]), abs=1e-2)

    # insert_gold [dev]: train pools are exactly the encoder's top 1 (gold or not), the dev pool still gets its gold
    report = mine.run(cfg.model_copy(update={"pool_size": 1, "insert_gold": ["dev"]}), rd)
    assert report["insert_gold"] == ["dev"] and report["pools_without_gold_insertion"] == 2
    pools = {r["qid"]: r for r in rd.read_table(CANDIDATES).to_pylist()}
    assert pools["q-cook"]["pid"] == "cook#2" and pools["q-cook"]["is_gold"]
    for topic in ("moon", "bird"):
        question = QUESTIONS[topic][0]
        cos = encode(model, TOPICS[topic]) @ encode(model, [question])[0]
        top = f"{topic}#{int(cos.argmax())}"
        assert pools[f"q-{topic}"]["pid"] == top
        assert pools[f"q-{topic}"]["is_gold"] == (top == f"{topic}#{QUESTIONS[topic][1]}")


@pytest.mark.slow
def test_mine_answer_passages_join_train_pools_only(ray_session, tmp_path) -> None:
    from uae_ray.models.encoder import encode, load_encoder
    from uae_ray.stages import mine

    rd = write_run(tmp_path, one_passage_docs=False)
    q = rd.read_table(QUERIES).to_pylist()
    answers = {"q-moon": ["July 1969"], "q-bird": ["Yes"], "q-cook": ["beaten eggs"]}
    for row in q:
        row["answers"] = answers[row["qid"]]
    rd.write_table(QUERIES, pa.Table.from_pylist(q, schema=QUERIES_SCHEMA))
    cfg = MineConfig(pool_size=1, insert_gold=["dev"], answer_passages=1,
                     pool={"min_size": 1, "max_size": 1, "batch_size": 4})
    report = mine.run(cfg, rd)
    # q-moon (train): the dense top 1 plus the passage its answer names; q-bird (train): a yes/no answer matches
    # nothing; q-cook (dev): not in answer_splits
    assert report["answer_mining"] == {"queries": 2, "no_matchable_answer": 1, "no_passage_matches_answer": 0,
                                       "pools_grown": 1, "passages_added": 1, "gold_added": 0}
    cands = rd.read_table(CANDIDATES)
    pools = {qid: cands.filter(pc.equal(cands["qid"], qid)).to_pylist() for qid in answers}
    assert len(pools["q-bird"]) == 1 and len(pools["q-cook"]) == 1
    model = load_encoder("all-minilm-l6-v2")
    cos = encode(model, TOPICS["moon"]) @ encode(model, [QUESTIONS["moon"][0]])[0]
    dense_top = int(cos.argmax())
    assert dense_top != 0  # the test needs the answer's passage (moon#0) outside the dense top 1
    moon = pools["q-moon"]
    assert {r["pid"] for r in moon} == {f"moon#{dense_top}", "moon#0"}
    assert [r["rank"] for r in moon] == [0, 1]
    assert [r["base_score"] for r in moon] == sorted((r["base_score"] for r in moon), reverse=True)
    added = next(r for r in moon if r["pid"] == "moon#0")
    assert added["base_score"] == pytest.approx(float(cos[0]), abs=1e-2) and not added["is_gold"]


@pytest.mark.slow
def test_mine_corpus_scope_by_split_and_reward_mix(ray_session, tmp_path) -> None:
    from uae_ray.data.schema import TEACHER_SCORES, TEACHER_SCORES_SCHEMA
    from uae_ray.stages import mine

    rd = write_run(tmp_path, one_passage_docs=True)
    cfg = MineConfig(pool_size=3, pool={"min_size": 1, "max_size": 1, "batch_size": 8})
    report = mine.run(cfg, rd)
    assert report["scope"] == "corpus"
    cands = rd.read_table(CANDIDATES).to_pylist()
    # The dev query never sees passages of train documents, and vice versa.
    train_docs = {"moon1", "bird3"}
    for r in cands:
        doc = r["pid"].replace("#", "")
        if r["qid"] == "q-cook":
            assert doc not in train_docs
        else:
            assert doc != "cook2"
    # Reward mix: a teacher that loves one non-gold passage pulls it to rank 0 at weight 1.
    moon = [r for r in cands if r["qid"] == "q-moon"]
    favourite = next(r["pid"] for r in moon if not r["is_gold"])
    ts = [{"qid": "q-moon", "pid": r["pid"], "teacher_score": 10.0 if r["pid"] == favourite else 0.0} for r in moon]
    rd.write_table(TEACHER_SCORES, pa.Table.from_pylist(ts, schema=TEACHER_SCORES_SCHEMA))
    mixed = mine.run(cfg.model_copy(update={"reward_weight": 1.0}), rd)
    assert mixed["reward_weight"] == 1.0 and mixed["teacher_scored_queries"] == 1
    new = [r for r in rd.read_table(CANDIDATES).to_pylist() if r["qid"] == "q-moon"]
    assert new[0]["pid"] == favourite and any(r["is_gold"] for r in new)


@pytest.mark.slow
def test_mine_errors_name_the_bad_row(ray_session, tmp_path) -> None:
    from uae_ray.stages import mine

    rd = write_run(tmp_path, one_passage_docs=False)
    q = rd.read_table(QUERIES).to_pylist()
    q[1]["gold_pids"] = ["nowhere#9"]
    rd.write_table(QUERIES, pa.Table.from_pylist(q, schema=QUERIES_SCHEMA))
    with pytest.raises(ValueError, match=r"qid 'q-cook' has gold pid 'nowhere#9'"):
        mine.run(MineConfig(), rd)
