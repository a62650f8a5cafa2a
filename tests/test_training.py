"""Training: data grouping and hard negatives, checkpoints, and real 2-worker Ray Train runs (reward model, student,
kill + resume), plus score-reward through Ray Data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from _training_data import build_tiny_run

from uae_ray.config import ScoreRewardConfig, TrainEncoderConfig, TrainRewardConfig, TrainScaling
from uae_ray.data import schema
from uae_ray.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from uae_ray.training.data import (
    answer_patterns,
    build_encoder_examples,
    build_reward_groups,
    contains_answer,
    heldout_documents,
    select_hard_negatives,
    steps_per_epoch,
    worker_batch,
)

ROOT = Path(__file__).resolve().parent.parent
TWO = TrainScaling(num_workers=2, cpus_per_worker=1)


# ------------------------------------------------------------------------------------------------------ data (fast)
def test_hard_negatives_skip_useful_and_gold():
    pids = ["g", "a", "b", "c", "d"]
    base = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    teacher = np.array([3.0, 2.5, -1.0, 0.0, -2.0])  # "a" is useful (top 20%): a false negative, never chosen
    negs = select_hard_negatives(pids, base, teacher, {"g"}, n=3, useful_quantile=0.7)
    assert "g" not in negs and "a" not in negs
    assert negs[0] == "b"  # similar to the query yet useless: z(base) - z(teacher) is highest
    # without a teacher: plain base-similarity order
    assert select_hard_negatives(pids, base, None, {"g"}, n=2, useful_quantile=0.9) == ["a", "b"]


def test_encoder_examples_counts_skips(tmp_path):
    rd = build_tiny_run(str(tmp_path), n_docs=4)
    queries = rd.read_table(schema.QUERIES)
    # one query whose gold passage is not in the corpus
    q = queries.to_pylist()
    q[0]["gold_pids"] = ["nope#0"]
    queries = pa.Table.from_pylist(q, schema=schema.QUERIES_SCHEMA)
    examples, counts = build_encoder_examples(
        queries, rd.read_table(schema.CORPUS), rd.read_table(schema.CANDIDATES), rd.read_table(schema.TEACHER_SCORES),
        n_hard_negatives=3, useful_quantile=0.9,
    )
    assert counts["no_gold"] == 1
    assert counts["examples"] == len(examples) == 7  # 8 train queries in 4 train docs, one without gold
    for e in examples:
        assert e.gold[0] and not any(e.gold[1:])
        assert len(set(e.pids)) == len(e.pids) <= 4


def test_answer_patterns_and_whole_word_match():
    assert answer_patterns(["The Red", "Yes", "", "red", "no", "BLEU-4 score."]) == ["red", "bleu4 score"]
    assert contains_answer("Its feathers are RED, always.", ["red"])
    assert not contains_answer("Its feathers are reddish.", ["red"])  # whole words only
    assert contains_answer("They report a BLEU-4 score of 27.", ["bleu4 score"])
    assert not contains_answer("anything", [])


def _tables(rd):
    return {n: rd.read_table(n) for n in (schema.QUERIES, schema.CORPUS, schema.CANDIDATES, schema.TEACHER_SCORES)}


def test_positives_answer_match_is_distant_supervision(tmp_path):
    t = _tables(build_tiny_run(str(tmp_path), n_docs=8))
    q = t[schema.QUERIES].to_pylist()
    q[0]["answers"] = ["Yes"]  # nothing to match on
    q[1]["gold_pids"] = []  # no annotation: answer-match does not need one
    queries = pa.Table.from_pylist(q, schema=schema.QUERIES_SCHEMA)
    answers = {r["qid"]: answer_patterns(r["answers"]) for r in q}
    examples, counts = build_encoder_examples(
        queries, t[schema.CORPUS], t[schema.CANDIDATES], None, n_hard_negatives=3, useful_quantile=0.9,
        positives="answer_match")
    assert counts["no_matchable_answer"] == 1
    train = sum(r["split"] == "train" for r in q)
    assert counts["examples"] == len(examples) == train - 1 - counts.get("no_answer_match", 0)
    assert q[1]["qid"] in {e.qid for e in examples}
    texts = dict(zip(t[schema.CORPUS]["pid"].to_pylist(), t[schema.CORPUS]["text"].to_pylist(), strict=True))
    for e in examples:
        assert 1 <= sum(e.gold) <= 2 and e.gold == sorted(e.gold, reverse=True)  # positives first, at most half
        for pid, pos in zip(e.pids, e.gold, strict=True):
            assert contains_answer(texts[pid], answers[e.qid]) == pos  # a match beyond the cap is no negative
    assert counts["positives"] == sum(sum(e.gold) for e in examples)
    with pytest.raises(ValueError, match="answers column"):
        build_encoder_examples(queries.drop(["answers"]), t[schema.CORPUS], t[schema.CANDIDATES], None,
                               n_hard_negatives=3, useful_quantile=0.9, positives="answer_match")


def test_positives_from_the_teacher(tmp_path):
    t = _tables(build_tiny_run(str(tmp_path), n_docs=8))
    q = t[schema.QUERIES].to_pylist()
    q[0]["gold_pids"] = ["nope#0"]  # teacher_top reads no annotation: still an example
    queries = pa.Table.from_pylist(q, schema=schema.QUERIES_SCHEMA)
    teacher: dict[str, dict[str, float]] = {}
    for r in t[schema.TEACHER_SCORES].to_pylist():
        teacher.setdefault(r["qid"], {})[r["pid"]] = r["teacher_score"]
    top, counts = build_encoder_examples(queries, t[schema.CORPUS], t[schema.CANDIDATES], t[schema.TEACHER_SCORES],
                                         n_hard_negatives=3, useful_quantile=0.9, positives="teacher_top")
    assert "no_gold" not in counts and q[0]["qid"] in {e.qid for e in top}
    for e in top:
        assert e.gold == [True, False, False, False]
        assert e.pids[0] == max(teacher[e.qid], key=teacher[e.qid].get)
    useful, counts = build_encoder_examples(queries, t[schema.CORPUS], t[schema.CANDIDATES],
                                            t[schema.TEACHER_SCORES], n_hard_negatives=3, useful_quantile=0.5,
                                            positives="gold_and_useful")
    assert counts["no_gold"] == 1
    golds = {r["qid"]: r["gold_pids"] for r in q}
    for e in useful:
        n_pos = sum(e.gold)
        assert e.pids[0] in golds[e.qid] and 1 <= n_pos <= 2 and len(e.pids) <= 4
        threshold = np.quantile(list(teacher[e.qid].values()), 0.5)
        assert all(teacher[e.qid][p] >= threshold for p in e.pids[1:n_pos])
    assert any(sum(e.gold) == 2 for e in useful)
    with pytest.raises(ValueError, match="needs teacher scores"):
        build_encoder_examples(queries, t[schema.CORPUS], t[schema.CANDIDATES], None, n_hard_negatives=3,
                               useful_quantile=0.9, positives="teacher_top")


def test_teacher_top_margin_skips_unsure_queries(tmp_path):
    t = _tables(build_tiny_run(str(tmp_path), n_docs=8))
    teacher: dict[str, list[float]] = {}
    for r in t[schema.TEACHER_SCORES].to_pylist():
        teacher.setdefault(r["qid"], []).append(r["teacher_score"])
    pool = {r["qid"] for r in t[schema.CANDIDATES].to_pylist()}
    train = {r["qid"] for r in t[schema.QUERIES].to_pylist() if r["split"] == "train"} & pool
    gaps = {q: float(np.diff(sorted(teacher[q])[-2:])[0]) for q in train}
    margin = float(np.median(list(gaps.values())))
    args = (t[schema.QUERIES], t[schema.CORPUS], t[schema.CANDIDATES], t[schema.TEACHER_SCORES])
    kept, counts = build_encoder_examples(*args, n_hard_negatives=3, useful_quantile=0.9, positives="teacher_top",
                                          min_teacher_margin=margin)
    assert {e.qid for e in kept} == {q for q, g in gaps.items() if g >= margin}
    assert counts["low_teacher_margin"] == sum(g < margin for g in gaps.values()) > 0
    everything, _ = build_encoder_examples(*args, n_hard_negatives=3, useful_quantile=0.9, positives="teacher_top")
    assert len(everything) == len(train) > len(kept) > 0
    with pytest.raises(ValueError, match="teacher_top only"):
        TrainEncoderConfig(positives="gold", min_teacher_margin=0.1)
    with pytest.raises(ValueError, match="teacher_top"):
        build_encoder_examples(*args, n_hard_negatives=3, useful_quantile=0.9, positives="gold",
                               min_teacher_margin=0.1)


def test_reward_groups_and_heldout_by_document(tmp_path):
    rd = build_tiny_run(str(tmp_path), n_docs=8)
    util = rd.read_table(schema.UTILITIES)
    dup = util.slice(0, 1)
    unknown = pa.Table.from_pylist([{**util.slice(0, 1).to_pylist()[0], "pid": "missing#9"}], schema=util.schema)
    groups, skips = build_reward_groups(
        rd.read_table(schema.QUERIES), rd.read_table(schema.CORPUS), pa.concat_tables([util, dup, unknown])
    )
    assert skips == {"duplicate_pair": 1, "unknown_pid": 1}
    assert len(groups) == 16 and all(len(g.pids) == len(g.utilities) >= 2 for g in groups)
    held = heldout_documents([g.doc_id for g in groups], 0.25, seed=13)
    assert 1 <= len(held) < 8 and held == heldout_documents([g.doc_id for g in groups], 0.25, seed=13)


def test_worker_batches_are_disjoint_and_deterministic():
    n, world, per = 11, 2, 2
    steps = steps_per_epoch(n, world, per)
    assert steps == 2
    seen = [i for s in range(steps) for r in range(world) for i in
            worker_batch(n, epoch=0, step=s, rank=r, world=world, per_worker=per, seed=1)]
    assert len(seen) == len(set(seen)) == 8
    assert worker_batch(n, epoch=1, step=0, rank=0, world=2, per_worker=2, seed=1) == worker_batch(
        n, epoch=1, step=0, rank=0, world=2, per_worker=2, seed=1)


def test_rank_plan_is_seeded_epoch_dependent_and_a_resume_replays_the_same_batches():
    """Each rank's batches: today's assignment (worker_batch over the examples sorted by qid), disjoint across ranks
    and steps, another order each epoch, the same for the same seed whatever order the table's blocks stream in, and
    a run resumed at step k of an epoch gets exactly the batches k.. of the uninterrupted run."""
    from uae_ray.training.data import RewardGroup
    from uae_ray.training.dataset import rank_batches, rank_plan, sorted_qids

    n, world, per, seed = 11, 2, 2, 7
    rows = [{"qid": f"q{i:02d}", "doc_id": "d", "split": "train", "question": f"question {i}", "pids": ["a", "b"],
             "passages": [f"text {i}a", f"text {i}b"], "utilities": [1.0, 0.0], "extra": i} for i in range(n)]
    rng = np.random.default_rng(0)
    table = pa.Table.from_pylist([rows[i] for i in rng.permutation(n)])  # the table is in no particular order
    blocks = [table.slice(0, 4), table.slice(4, 3), table.slice(7)]
    qids = sorted_qids(blocks)
    assert qids == [r["qid"] for r in rows]
    steps = steps_per_epoch(n, world, per)

    def plan(epoch: int, rank: int, first: int = 0, s: int = seed) -> list[list[str]]:
        return rank_plan(qids, epoch=epoch, first_step=first, n_steps=steps, rank=rank, world=world,
                         per_worker=per, seed=s)

    for epoch in (0, 1):
        for rank in range(world):
            assert plan(epoch, rank) == [[qids[i] for i in worker_batch(
                n, epoch=epoch, step=st, rank=rank, world=world, per_worker=per, seed=seed)] for st in range(steps)]
        seen = [q for rank in range(world) for b in plan(epoch, rank) for q in b]
        assert len(seen) == len(set(seen)) == steps * world * per
    assert plan(0, 0) != plan(1, 0) and plan(0, 0) != plan(0, 0, s=seed + 1)
    assert plan(1, 1, first=1) == plan(1, 1)[1:]  # resumed after step 0 of epoch 1

    full = rank_batches(blocks, plan(1, 0), RewardGroup)
    assert [[g.qid for g in b] for b in full] == plan(1, 0)
    assert full[0][0].passages == rows[int(full[0][0].qid[1:])]["passages"]
    assert rank_batches(list(reversed(blocks)), plan(1, 0), RewardGroup) == full  # block order does not matter
    assert rank_batches(blocks, plan(1, 0, first=1), RewardGroup) == full[1:]
    with pytest.raises(ValueError, match="lacks 1 planned"):
        rank_batches(blocks[1:], [[blocks[0]["qid"][0].as_py()]], RewardGroup)  # its block never streamed
    with pytest.raises(ValueError, match="twice"):
        sorted_qids([table, table.slice(0, 1)])


def test_checkpoint_roundtrip_restores_model_optimizer_and_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, TrainState(epoch=1, step_in_epoch=2, global_step=7,
                                                     history=[{"step": 7, "epoch": 1, "loss": 0.5}]))
    model2 = torch.nn.Linear(4, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    state = load_checkpoint(tmp_path, model2, opt2)
    assert (state.epoch, state.step_in_epoch, state.global_step) == (1, 2, 7)
    assert torch.equal(model.weight, model2.weight)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and float(s1["step"]) == float(s2["step"])
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_checkpoint(tmp_path, model2, opt2)


def test_checkpoint_of_another_config_is_never_resumed(tmp_path, caplog):
    """A checkpoint records the fingerprint of the settings and examples it trained on: the same ones resume it,
    another lr, other examples or a checkpoint without a fingerprint start from step 0 and leave the model alone."""
    from uae_ray.training.checkpoint import resume_state, training_fingerprint

    cfg = TrainEncoderConfig(lr=2e-4, scaling=TWO).model_dump()
    examples = [{"qid": "q1", "pids": ["a", "b"]}]
    fp = training_fingerprint(cfg, examples)
    # where and how often a run checkpoints is not what it trains
    assert training_fingerprint({**cfg, "checkpoint_every_steps": 5, "output": "enc2",
                                 "scaling": {**cfg["scaling"], "cpus_per_worker": 2.0}}, examples) == fp
    other_lr = training_fingerprint({**cfg, "lr": 1e-3}, examples)
    assert other_lr != fp and training_fingerprint(cfg, [*examples, {"qid": "q2"}]) != fp
    assert training_fingerprint({**cfg, "scaling": {**cfg["scaling"], "num_workers": 4}}, examples) != fp

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, TrainState(epoch=1, global_step=7, config_fingerprint=fp))
    fresh = torch.nn.Linear(4, 2)
    before = fresh.weight.detach().clone()
    state = resume_state(tmp_path, fresh, torch.optim.AdamW(fresh.parameters(), lr=0.1), other_lr)
    assert (state.global_step, state.resumed_from, state.config_fingerprint) == (0, [], other_lr)
    assert torch.equal(fresh.weight, before) and "not resumed" in caplog.text
    state = resume_state(tmp_path, fresh, torch.optim.AdamW(fresh.parameters(), lr=0.1), fp)
    assert (state.global_step, state.resumed_from) == (7, [7]) and torch.equal(fresh.weight, model.weight)
    save_checkpoint(tmp_path, model, opt, TrainState(global_step=3))  # written before fingerprints existed
    assert resume_state(tmp_path, torch.nn.Linear(4, 2), opt, fp).global_step == 0


# ----------------------------------------------------------------------------------- Ray Data: examples (1 cluster)
# -------------------------------------------------------------------------------------- Ray Train (2 gloo workers)
def _epoch_means(history: list[dict]) -> list[float]:
    epochs = sorted({h["epoch"] for h in history})
    return [float(np.mean([h["loss"] for h in history if h["epoch"] == e])) for e in epochs]


@pytest.fixture(scope="module")
def trained_reward_run(ray_session, tmp_path_factory):
    rd = build_tiny_run(str(tmp_path_factory.mktemp("reward_run")), n_docs=8)
    from uae_ray.stages import train_reward

    cfg = TrainRewardConfig(max_length=48, epochs=3, lr=2e-4, queries_per_step=2, group_size=6,
                            heldout_fraction=0.15, scaling=TWO)
    summary = train_reward.run(cfg, rd)
    return rd, cfg, summary


@pytest.mark.slow
def test_train_reward_two_workers_lowers_loss_and_writes_model(trained_reward_run):
    from uae_ray.models.reward import load_reward_model, score_pairs

    rd, _, summary = trained_reward_run
    assert rd.dir_complete(schema.REWARD_MODEL)
    train_log = json.loads((rd.local_path(schema.REWARD_MODEL) / "training.json").read_text())["state"]
    means = _epoch_means(train_log["history"])
    assert len(means) == 3 and means[-1] < means[0], means
    assert [h["step"] for h in train_log["history"]] == list(range(1, summary["steps"] + 1))
    report = rd.read_json(schema.REWARD_REPORT)
    assert report["eval"]["heldout"]["reward_model"]["spearman"] is not None
    assert rd.exists("reward_train_loss.png")
    assert len(list(rd.local_path(schema.CHECKPOINTS).glob("train_reward/checkpoint_*"))) >= 1
    model = load_reward_model(str(rd.local_path(schema.REWARD_MODEL)))
    s = score_pairs(model, ["What color are the feathers of the Zorblat?"] * 2,
                    ["The Zorblat is a rare creature whose feathers are blue in every season.",
                     "Scientists catalogued the Quimble in the year 1807 after a long expedition."], max_length=48)
    assert s.shape == (2,) and np.isfinite(s).all()


@pytest.mark.slow
def test_ray_data_builds_the_same_examples_and_the_loop_config_carries_none(trained_reward_run):
    """The examples built (in process, and by Ray Data) from the run directory's Parquet tables are exactly those of
    the pure builders on the whole tables; a rerun on unchanged inputs reuses the table; the trainer's loop config
    holds no example (no text, a size independent of the data)."""
    from dataclasses import asdict, replace

    from uae_ray.stages import train_encoder, train_reward
    from uae_ray.training.data import EncoderExample, RewardGroup
    from uae_ray.training.dataset import (
        BUILD_RECORD,
        IN_PROCESS_MAX_BYTES,
        TRAIN_DATA,
        _input_files,
        pickled_size,
        read_examples,
    )

    rd, rcfg, _ = trained_reward_run
    tables = {n: rd.read_table(n) for n in (schema.QUERIES, schema.CORPUS, schema.CANDIDATES, schema.UTILITIES,
                                            schema.TEACHER_SCORES)}
    record = rd.read_json(f"{TRAIN_DATA}/reward/{BUILD_RECORD}")
    inputs = train_reward.trainer_inputs(rcfg, rd)  # the fixture's run built it: reused, not rebuilt
    assert rd.read_json(f"{TRAIN_DATA}/reward/{BUILD_RECORD}") == record
    groups, skips = build_reward_groups(tables[schema.QUERIES], tables[schema.CORPUS], tables[schema.UTILITIES])
    assert inputs.skips == skips
    assert read_examples(rd, f"{TRAIN_DATA}/reward", [g.qid for g in groups], RewardGroup) == groups
    assert sorted(inputs.train + inputs.heldout + inputs.dev) == [g.qid for g in groups]
    assert sorted(inputs.datasets["train_qids"].to_pandas()["qid"]) == sorted(inputs.train)

    cfg = _encoder_cfg(epochs=1, teacher="reward_model")
    config, datasets, counts = train_encoder.trainer_inputs(cfg, rd)
    want, want_counts = build_encoder_examples(
        tables[schema.QUERIES], tables[schema.CORPUS], tables[schema.CANDIDATES], tables[schema.TEACHER_SCORES],
        n_hard_negatives=cfg.n_hard_negatives, useful_quantile=cfg.useful_quantile)
    assert counts == want_counts
    assert read_examples(rd, f"{TRAIN_DATA}/{cfg.output}", [e.qid for e in want], EncoderExample) == want
    assert sorted(datasets["train_qids"].to_pandas()["qid"]) == [e.qid for e in want]
    # distant supervision (answer-match positives, no teacher): the answers travel through the shuffle too
    ds_cfg = _encoder_cfg(epochs=1, loss="infonce", positives="answer_match", output="encoder_ds")
    _, _, ds_counts = train_encoder.trainer_inputs(ds_cfg, rd)
    ds_want, ds_want_counts = build_encoder_examples(
        tables[schema.QUERIES], tables[schema.CORPUS], tables[schema.CANDIDATES], None,
        n_hard_negatives=ds_cfg.n_hard_negatives, useful_quantile=ds_cfg.useful_quantile, positives="answer_match")
    assert ds_counts == ds_want_counts and ds_counts["examples"] > 0
    assert read_examples(rd, f"{TRAIN_DATA}/encoder_ds", [e.qid for e in ds_want], EncoderExample) == ds_want

    # the stages built these small tables in process; Ray Data's hash shuffles (what larger inputs take) build the
    # same examples, counts and hashes. The encoder's build is the one run both ways: the reward groups go through
    # the same two shuffles (by pid, then by query) with their own per-query function, which the in-process build
    # above already checked against the pure builder
    from uae_ray.training.dataset import build_encoder_data

    assert sum(f.size for f in _input_files(rd, [schema.CORPUS, schema.UTILITIES, schema.QUERIES])) \
        <= IN_PROCESS_MAX_BYTES
    enc_ray = build_encoder_data(rd, f"{TRAIN_DATA}/encoder_ray", teacher=(schema.TEACHER_SCORES, "teacher_score"),
                                 n_hard_negatives=cfg.n_hard_negatives, useful_quantile=cfg.useful_quantile,
                                 splits=tuple(cfg.splits), in_process_max_bytes=0)
    enc_local = build_encoder_data(rd, f"{TRAIN_DATA}/encoder_local", teacher=(schema.TEACHER_SCORES, "teacher_score"),
                                   n_hard_negatives=cfg.n_hard_negatives, useful_quantile=cfg.useful_quantile,
                                   splits=tuple(cfg.splits))
    assert rd.exists(f"{TRAIN_DATA}/encoder_local/part-000000.parquet")
    assert enc_ray.n_examples > 0 and (enc_ray.counts, enc_ray.row_hashes) == (enc_local.counts, enc_local.row_hashes)
    qids = sorted(rd.read_table(f"{TRAIN_DATA}/encoder_local", columns=["qid"])["qid"].to_pylist())
    assert read_examples(rd, f"{TRAIN_DATA}/encoder_ray", qids, EncoderExample) == \
        read_examples(rd, f"{TRAIN_DATA}/encoder_local", qids, EncoderExample)

    # the old loop config pickled every example: now about 1 KB whatever the data, and no text in it
    old_size = pickled_size({"examples": [asdict(e) for e in want]})
    for loop_cfg in (config, inputs.loop_config):
        assert loop_cfg["cache_examples"] is True  # a small table: each worker reads it once, not every epoch
        size = pickled_size(loop_cfg)
        assert size < 2048 < old_size, (size, old_size)
        blob = repr(loop_cfg)
        assert not any(e.question in blob or any(p in blob for p in e.passages) for e in want)
    from uae_ray.training.dataset import TrainData
    from uae_ray.training.loop import loop_config

    data = TrainData("x", len(want), {}, [f"{i:016x}" for i in range(len(want))])
    bigger = replace(data, n_examples=100 * len(want), row_hashes=[f"{i:016x}" for i in range(100 * len(want))])
    assert pickled_size(loop_config(cfg, bigger, rd, "encoder")) == pickled_size(loop_config(cfg, data, rd, "encoder"))


@pytest.mark.slow
def test_score_reward_scores_every_candidate(trained_reward_run):
    from uae_ray.models.reward import load_reward_model, score_pairs
    from uae_ray.stages import score_reward

    rd, _, _ = trained_reward_run
    rd.remove(schema.TEACHER_SCORES)  # the fixture's synthetic teacher scores
    summary = score_reward.run(ScoreRewardConfig(max_length=48), rd)
    out = rd.read_table(schema.TEACHER_SCORES)
    cands = rd.read_table(schema.CANDIDATES)
    assert out.schema.equals(schema.TEACHER_SCORES_SCHEMA)
    assert summary["scored"] == out.num_rows == cands.num_rows
    row = out.slice(0, 1).to_pylist()[0]
    q = {r["qid"]: r["question"] for r in rd.read_table(schema.QUERIES).to_pylist()}[row["qid"]]
    t = {r["pid"]: r["text"] for r in rd.read_table(schema.CORPUS).to_pylist()}[row["pid"]]
    model = load_reward_model(str(rd.local_path(schema.REWARD_MODEL)))
    assert score_pairs(model, [q], [t], max_length=48)[0] == pytest.approx(row["teacher_score"], abs=1e-4)


def _encoder_cfg(**kw) -> TrainEncoderConfig:
    base = dict(max_query_length=32, max_passage_length=48, queries_per_step=2, n_hard_negatives=3, lr=2e-4,
                scaling=TWO)
    return TrainEncoderConfig(**{**base, **kw})


@pytest.mark.slow
def test_train_encoder_two_workers_lowers_loss_and_saves_sentence_transformer(ray_session, tmp_path):
    from sentence_transformers import SentenceTransformer

    from uae_ray.stages import train_encoder

    rd = build_tiny_run(str(tmp_path), n_docs=8)
    summary = train_encoder.run(_encoder_cfg(epochs=3), rd)
    train_log = json.loads((rd.local_path("encoder") / "training.json").read_text())["state"]
    means = _epoch_means(train_log["history"])
    assert means[-1] < means[0], means
    assert summary["steps"] == 9 and rd.exists("encoder_train_loss.png")
    model = SentenceTransformer(str(rd.local_path("encoder")), device="cpu")
    emb = model.encode(["What color are the feathers of the Zorblat?", "blue feathers"], normalize_embeddings=False)
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # Normalize module kept


@pytest.mark.slow
def test_kill_midway_then_rerun_resumes_from_checkpoint(ray_session, tmp_path, monkeypatch):
    """The trainer's driver is killed after a checkpoint; the rerun resumes from it and continues the step counter.
    The rerun takes the path of a large example table (Ray Data read tasks, streamed by each worker every epoch),
    which no small test table takes otherwise, so that path is shown to resume exactly too. Then the model
    directory is lost after the last checkpoint (the driver died while saving): a rerun restores the final
    checkpoint instead of training again."""
    import ray

    from uae_ray.stages import train_encoder
    from uae_ray.training import dataset

    rd = build_tiny_run(str(tmp_path / "run"), n_docs=8)
    overrides = ["max_query_length=32", "max_passage_length=48", "queries_per_step=2", "n_hard_negatives=3",
                 "lr=2e-4", "epochs=3", "checkpoint_every_steps=2", "scaling.num_workers=2", "loss=infonce",
                 "output=encoder_infonce"]
    cmd = [sys.executable, "-m", "uae_ray.cli", "train-encoder", "--run-dir", rd.uri,
           "--address", ray.get_runtime_context().gcs_address]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "killed_run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ckpt_root = rd.local_path(schema.CHECKPOINTS) / "train_encoder-encoder_infonce"
    deadline = time.time() + 300
    try:
        # a checkpoint is resumable once Ray Train's controller has recorded it in its snapshot (written after the
        # checkpoint directory is persisted): kill right after that
        while time.time() < deadline and not (ckpt_root / "checkpoint_manager_snapshot.json").exists():
            assert proc.poll() is None, f"trainer exited before its first checkpoint:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.3)
        assert list(ckpt_root.glob("checkpoint_*")), f"no checkpoint in time:\n{log_path.read_text()[-3000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill the driver mid-run (its Train workers die with its job)
        proc.wait()
    assert not rd.dir_complete("encoder_infonce"), "the run finished before it was killed"

    monkeypatch.setattr(dataset, "CACHE_MAX_BYTES", 0)  # decided on the driver: in_memory() is False for this run
    cfg = _encoder_cfg(epochs=3, checkpoint_every_steps=2, loss="infonce", output="encoder_infonce")
    summary = train_encoder.run(cfg, rd)
    total = steps_per_epoch(14, 2, 2) * 3
    assert summary["steps"] == total
    assert summary["resumed_from_step"] and 2 <= summary["resumed_from_step"][0] < total
    history = json.loads((rd.local_path("encoder_infonce") / "training.json").read_text())["state"]["history"]
    assert [h["step"] for h in history] == list(range(1, total + 1))  # the step counter continued, no repeats

    rd.remove("encoder_infonce")
    rd.remove("encoder_infonce_report.json")
    again = train_encoder.run(cfg, rd)
    # the model's resume history: the resume after the kill, then this restore of the final checkpoint
    assert again["steps"] == total and again["resumed_from_step"] == [*summary["resumed_from_step"], total]
    assert [h["step"] for h in json.loads((rd.local_path("encoder_infonce") / "training.json").read_text())[
        "state"]["history"]] == list(range(1, total + 1))


def test_lora_student_trains_and_saves_merged(tmp_path):
    """LoRA (peft) on the student: only adapters train; the saved merged model encodes like the adapted one."""
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    from uae_ray.config import LoraConfig
    from uae_ray.training.loop import build_student, save_student

    cfg = TrainEncoderConfig(lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    model = build_student(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    feats = model.tokenizer(["a question about feathers", "blue feathers all year"], padding=True,
                            return_tensors="pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    emb = F.normalize(model(dict(feats))["sentence_embedding"], dim=-1)
    (-(emb[0] @ emb[1])).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        adapted = F.normalize(model(dict(feats))["sentence_embedding"], dim=-1).numpy()
    save_student(model, cfg, tmp_path / "student")
    loaded = SentenceTransformer(str(tmp_path / "student"), device="cpu")
    merged = loaded.encode(["a question about feathers", "blue feathers all year"], normalize_embeddings=True)
    np.testing.assert_allclose(merged, adapted, atol=1e-4)
    base = build_student(TrainEncoderConfig()).encode(["a question about feathers"], normalize_embeddings=True)
    assert not np.allclose(base[0], merged[0], atol=1e-4)  # the adapter changed the weights that were saved


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(lora: bool):
    """Recomputing activations in backward changes memory, not the math: same loss and gradients (dropout on)."""
    import torch.nn.functional as F

    from uae_ray.config import LoraConfig
    from uae_ray.training.loop import build_student

    texts = ["a question about feathers", "blue feathers all year round, said the birdwatcher"]
    lora_cfg = LoraConfig(r=4, alpha=8, dropout=0.0) if lora else None
    grads, losses = [], []
    for checkpointing in (False, True):
        model = build_student(TrainEncoderConfig(gradient_checkpointing=checkpointing, lora=lora_cfg))
        inner = model[0].model
        assert inner.is_gradient_checkpointing is checkpointing
        model.train()
        torch.manual_seed(0)
        feats = model.tokenizer(texts, padding=True, return_tensors="pt")
        emb = F.normalize(model(dict(feats))["sentence_embedding"], dim=-1)
        loss = -(emb[0] @ emb[1])
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_teacher_source_names_the_configured_teacher(tmp_path):
    """teacher=reward_model reads score-reward's table, teacher=utilities the label stage's parts; missing -> named."""
    import pyarrow as pa

    from uae_ray.data.schema import TEACHER_SCORES, UTILITIES, UTILITIES_SCHEMA
    from uae_ray.runtime import RunDir
    from uae_ray.stages.train_encoder import teacher_source

    run_dir = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"teacher_scores\.parquet.*score-reward"):
        teacher_source(TrainEncoderConfig(), run_dir)
    with pytest.raises(FileNotFoundError, match=r"utilities.*run label"):
        teacher_source(TrainEncoderConfig(teacher="utilities"), run_dir)
    scores = {"qid": ["q1", "q1"], "pid": ["a", "b"], "teacher_score": [0.5, -1.0]}
    run_dir.write_table(TEACHER_SCORES, pa.table(scores))
    for i, (pid, u) in enumerate([("a", 2.25), ("b", -0.5)]):
        run_dir.write_table(f"{UTILITIES}/part-{i:06d}.parquet", pa.table({
            "qid": ["q1"], "pid": [pid], "logp_with": [-1.0], "logp_without": [-1.0 - u], "n_answer_tokens": [3],
            "utility": [u], "generator": ["g"], "prompt_version": ["v"]}, schema=UTILITIES_SCHEMA))
    assert teacher_source(TrainEncoderConfig(), run_dir) == (TEACHER_SCORES, "teacher_score")
    table, column = teacher_source(TrainEncoderConfig(teacher="utilities"), run_dir)
    assert run_dir.read_table(table, columns=["pid", column]).sort_by("pid").to_pydict() == {
        "pid": ["a", "b"], "utility": [2.25, -0.5]}
