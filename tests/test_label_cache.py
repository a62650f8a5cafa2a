"""Content-keyed labels: a rerun labels exactly the pairs whose content or numeric settings changed, on a real Ray
cluster with the real SmolLM2 generator.

One labeled run dir (4 queries x 4 passages; the last query has only empty answers: 4 skips) is made once per module
and copied by each test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from _label_data import write_label_run

from uae_ray.config import LabelConfig
from uae_ray.data.schema import (
    CORPUS,
    LABEL_BASELINE,
    LABEL_CACHE,
    LABEL_SKIPPED,
    QUERIES,
    UTILITIES,
)
from uae_ray.runtime import RunDir

CFG = LabelConfig(dtype="float32", rows_per_part=5, rows_per_batch=4,
                  pool={"min_size": 1, "max_size": 1, "batch_size": 4})
N_PAIRS = 16


def _view(rd: RunDir) -> dict[tuple[str, str], dict]:
    """(qid, pid) -> the view row (labels and skips together)."""
    rows = rd.read_table(UTILITIES).to_pylist() + rd.read_table(LABEL_SKIPPED).to_pylist()
    return {(r["qid"], r["pid"]): r for r in rows}


def _edit(rd: RunDir, name: str, key: str, value: str, column: str, new: object) -> None:
    t = rd.read_table(name)
    i = t[key].to_pylist().index(value)
    col = t[column].to_pylist()
    col[i] = new
    rd.write_table(name, t.set_column(t.schema.get_field_index(column), column, pa.array(col, t[column].type)))


@pytest.fixture(scope="module")
def labeled_run(ray_session, tmp_path_factory) -> tuple[Path, dict]:
    from uae_ray.stages import label

    root = tmp_path_factory.mktemp("labeled") / "run"
    rd, n = write_label_run(root, n_queries=4)
    assert n == N_PAIRS
    report = label.run(CFG, rd)
    assert report["new"] == N_PAIRS and report["reused"] == 0 and report["skipped"] == {"empty_answer": 4}
    return root, report


def _copy(labeled_run: tuple[Path, dict], tmp_path: Path) -> RunDir:
    shutil.copytree(labeled_run[0], tmp_path / "run")
    return RunDir(tmp_path / "run")


@pytest.mark.slow
def test_edited_passage_then_edited_answers_relabel_exactly_their_pairs(labeled_run, tmp_path) -> None:
    from uae_ray.stages import label

    rd = _copy(labeled_run, tmp_path)
    before = _view(rd)
    # 1. one passage's text changes under the same pid: exactly its 4 pairs (3 labels, 1 skip) are new
    _edit(rd, CORPUS, "pid", "p1", "text", "Canberra, not Sydney, is the capital city of Australia.")
    r = label.run(CFG, rd)
    assert (r["reused"], r["new"], r["unaccounted"]) == (12, 4, 0)
    assert r["this_run"]["labeled"] == 3 and r["this_run"]["skipped"] == {"empty_answer": 1}
    assert r["this_run"]["baseline"] == {"needed": 4, "reused": 4, "new": 0}  # no question or answer changed
    assert r["cache"] == {"rows": 20, "orphaned": 4, "orphaned_other_settings": 0}  # the old p1 rows
    after = _view(rd)
    assert set(after) == set(before)
    for key, row in after.items():
        if key[1] == "p1":
            assert row["fingerprint"] != before[key]["fingerprint"], key
        else:
            assert row == before[key], key  # reused as is: same fingerprint, bit-identical numbers
    assert after[("q1", "p1")]["utility"] != before[("q1", "p1")]["utility"]
    # 2. the empty-answer query gets an answer: its 4 skips become labels, with a new no-passage term; nothing else
    _edit(rd, QUERIES, "qid", "q3", "answers", ["Jupiter"])
    r = label.run(CFG, rd)
    assert (r["reused"], r["new"]) == (12, 4)
    assert r["this_run"]["labeled"] == 4 and r["this_run"]["skipped"] == {}
    assert r["this_run"]["baseline"] == {"needed": 1, "reused": 0, "new": 1}
    assert r["labeled"] == N_PAIRS and r["skipped"] == {}  # a skip made for other answers is no skip now
    assert r["cache"]["orphaned"] == 8
    again = _view(rd)
    assert rd.read_table(LABEL_SKIPPED).num_rows == 0
    for key, row in again.items():
        if key[0] != "q3":
            assert row == after[key], key
    best = max((k for k in again if k[0] == "q3"), key=lambda k: again[k]["utility"])
    assert best == ("q3", "p3")  # the Jupiter passage helps the Jupiter answer most
    # one no-passage row per (question, answers) ever seen: 4 from the first run + the new q3 answers
    assert rd.read_table(LABEL_BASELINE).num_rows == 5


@pytest.mark.slow
def test_numeric_setting_changes_relabel_everything_and_never_mix(labeled_run, tmp_path) -> None:
    from uae_ray.stages import label

    rd = _copy(labeled_run, tmp_path)
    fp32 = _view(rd)
    # another prompt: no error, every pair and every no-passage term is new, under the new prompt version
    qasper = CFG.model_copy(update={"prompt": "qasper"})
    r = label.run(qasper, rd)
    assert (r["reused"], r["new"], r["labeled"], r["skipped"]) == (0, N_PAIRS, 12, {"empty_answer": 4})
    assert r["this_run"]["baseline"] == {"needed": 4, "reused": 0, "new": 4}
    assert r["cache"] == {"rows": 32, "orphaned": 16, "orphaned_other_settings": 16}
    view = _view(rd)
    assert {row["prompt_version"] for row in view.values()} == {r["prompt_version"]}
    assert r["prompt_version"] != labeled_run[1]["prompt_version"]
    assert all(view[k]["fingerprint"] != fp32[k]["fingerprint"] for k in view)
    # float32 -> bfloat16: every pair relabeled against a bf16 no-passage term (never the fp32 one)
    bf16 = CFG.model_copy(update={"dtype": "bfloat16"})
    r = label.run(bf16, rd)
    assert (r["reused"], r["new"], r["dtype"]) == (0, N_PAIRS, "bfloat16")
    assert r["this_run"]["baseline"] == {"needed": 4, "reused": 0, "new": 4}
    util = rd.read_table(UTILITIES)
    base = rd.read_table(LABEL_BASELINE)
    base = base.filter(pc.equal(base["settings"], r["settings"]))
    assert base.num_rows == 4
    bf16_without = {q: lp[0] for q, lp in zip(base["qid"].to_pylist(), base["logp"].to_pylist(), strict=True) if lp}
    fp32_without = {k[0]: row["logp_without"] for k, row in fp32.items() if "logp_without" in row}
    for q, lo in zip(util["qid"].to_pylist(), util["logp_without"].to_pylist(), strict=True):
        assert lo == pytest.approx(bf16_without[q], abs=1e-6), q
        assert lo != fp32_without[q], q  # bf16 and fp32 differ: the fp32 term was not reused
    # back to float32: nothing to label, and the view is the first run's again, bit for bit
    r = label.run(CFG, rd)
    assert (r["reused"], r["new"], r["this_run"]["tokens"]) == (N_PAIRS, 0, 0)
    assert _view(rd) == fp32


@pytest.mark.slow
def test_settings_that_do_not_change_numbers_relabel_nothing(labeled_run, tmp_path) -> None:
    from uae_ray.stages import label

    rd = _copy(labeled_run, tmp_path)
    before, parts = _view(rd), rd.listdir(LABEL_CACHE)
    moved = CFG.model_copy(update={"rows_per_part": 1, "rows_per_batch": 2,
                                   "pool": CFG.pool.model_copy(update={"max_size": 3, "batch_size": 2})})
    r = label.run(moved, rd)
    assert (r["reused"], r["new"], r["this_run"]["labeled"], r["this_run"]["tokens"]) == (N_PAIRS, 0, 0, 0)
    assert r["cache"] == {"rows": N_PAIRS, "orphaned": 0, "orphaned_other_settings": 0}
    assert rd.listdir(LABEL_CACHE) == parts and _view(rd) == before
    # a split left out: its pairs leave the view (orphaned in the cache), and come back without labeling
    _edit(rd, QUERIES, "qid", "q0", "split", "dev")
    r = label.run(moved.model_copy(update={"splits": ["train"]}), rd)
    assert (r["pairs"], r["reused"], r["new"], r["cache"]["orphaned"]) == (12, 12, 0, 4)
    assert "q0" not in {k[0] for k in _view(rd)}
    r = label.run(moved, rd)
    assert (r["reused"], r["new"]) == (N_PAIRS, 0) and _view(rd) == before


@pytest.mark.slow
def test_an_actor_scoring_under_other_settings_than_the_driver_keyed_refuses(ray_session) -> None:
    """A worker that resolves ``dtype: auto`` to another dtype than the driver would store wrong keys: it stops."""
    from uae_ray.labeling.pipeline import BaselineBatch
    from uae_ray.labeling.prompts import prompt_version_for
    from uae_ray.stages import label

    queries = pa.table({"qid": ["q"], "question": ["Who wrote Hamlet?"], "answers": [["William Shakespeare"]]})
    ctx = {"settings": "0" * 32, "version": prompt_version_for(CFG)}  # what a driver on other hardware would key
    with pytest.raises(ray_session.exceptions.ActorDiedError) as err:  # the actor's constructor raised
        label._map_on_actor_pool(queries, BaselineBatch, CFG, 1, ctx).take_all()
    assert "ScorerSettingsError" in str(err.value) and "Set label.dtype explicitly" in str(err.value)
