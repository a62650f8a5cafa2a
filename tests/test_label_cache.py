"""Content-keyed labels: a rerun labels exactly the pairs whose content or numeric settings changed, on a real Ray
cluster with the real SmolLM2 generator; the LLM budget (``max_docs_per_split``) and ``reuse_from`` (labels taken
from another run dir's cache).

One labeled run dir (4 queries x 4 passages; the last query has only empty answers: 4 skips) is made once per module
and copied by each test. The tests without Ray write a cache by hand (every pair already labeled: the stage starts
no actor) and check what the stage reads, copies and reports.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from _label_data import write_label_run

from uae_ray.config import LabelConfig
from uae_ray.data.schema import (
    CANDIDATES,
    CORPUS,
    LABEL_BASELINE,
    LABEL_BASELINE_SCHEMA,
    LABEL_CACHE,
    LABEL_CACHE_SCHEMA,
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
    # no question or answer changed
    assert r["this_run"]["baseline"] == {"needed": 4, "reused": 4, "new": 0, "from_other_run_dirs": 0}
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
    assert r["this_run"]["baseline"] == {"needed": 1, "reused": 0, "new": 1, "from_other_run_dirs": 0}
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
    assert r["this_run"]["baseline"] == {"needed": 4, "reused": 0, "new": 4, "from_other_run_dirs": 0}
    assert r["cache"] == {"rows": 32, "orphaned": 16, "orphaned_other_settings": 16}
    view = _view(rd)
    assert {row["prompt_version"] for row in view.values()} == {r["prompt_version"]}
    assert r["prompt_version"] != labeled_run[1]["prompt_version"]
    assert all(view[k]["fingerprint"] != fp32[k]["fingerprint"] for k in view)
    # float32 -> bfloat16: every pair relabeled against a bf16 no-passage term (never the fp32 one)
    bf16 = CFG.model_copy(update={"dtype": "bfloat16"})
    r = label.run(bf16, rd)
    assert (r["reused"], r["new"], r["dtype"]) == (0, N_PAIRS, "bfloat16")
    assert r["this_run"]["baseline"] == {"needed": 4, "reused": 0, "new": 4, "from_other_run_dirs": 0}
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


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime) by relative path (a run dir that must stay untouched)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_reuse_from_takes_the_pairs_another_run_dir_labeled(labeled_run, tmp_path) -> None:
    """Run dir B with ``reuse_from: [A]`` labels only what A has not: A's labels and the no-passage terms B's new pairs
    share with A are copied into B's own run dir (B stays whole once A is gone), bit-identical, and A is never
    written."""
    from uae_ray.stages import label

    a = _copy(labeled_run, tmp_path)  # A: q0..q3 x p0..p3 labeled (q3: empty answers, 4 skips)
    a_before, a_view = _snapshot(tmp_path / "run"), _view(a)
    a_terms = {r["fingerprint"]: r for r in label.read_parts(a, LABEL_BASELINE, LABEL_BASELINE_SCHEMA).to_pylist()}
    # B: q0..q2 as in A, each with a fifth passage p4; q3 now has an answer (Jupiter) and q4 (Hamlet) has only empty
    # answers: both new to A
    b, n = write_label_run(tmp_path / "b", n_queries=5, n_passages=5)
    assert n == 25
    a_dir = str((tmp_path / "run").resolve())
    r = label.run(CFG.model_copy(update={"reuse_from": [str(tmp_path / "run")]}), b)
    assert r["reused_from_other_run_dirs"] == {a_dir: 12}
    assert (r["pairs"], r["reused"], r["new"], r["unaccounted"]) == (25, 12, 13, 0)
    assert r["this_run"]["labeled"] == 8 and r["this_run"]["skipped"] == {"empty_answer": 5}
    # q0..q2 x p4 need q0..q2's no-passage terms: copied from A, not recomputed; only q3's and q4's are new
    assert r["this_run"]["baseline"] == {"needed": 5, "reused": 3, "new": 2, "from_other_run_dirs": 3}
    assert r["labeled"] == 20 and r["skipped"] == {"empty_answer": 5}
    cache = label.read_parts(b, LABEL_CACHE, LABEL_CACHE_SCHEMA)
    assert cache.num_rows == 25 and len(set(cache["fingerprint"].to_pylist())) == 25  # 12 copied + 13 new, once each
    b_terms = {r["fingerprint"]: r for r in label.read_parts(b, LABEL_BASELINE, LABEL_BASELINE_SCHEMA).to_pylist()}
    shared = set(a_terms) & set(b_terms)
    assert len(shared) == 3 and len(b_terms) == 5
    assert all(b_terms[fp] == a_terms[fp] for fp in shared)  # copied bit for bit (float32 logp lists)
    b_view = _view(b)
    for key, row in a_view.items():
        if key[0] != "q3":
            assert b_view[key] == row, key  # taken as is: same fingerprint, bit-identical numbers
    for q in ("q0", "q1", "q2"):  # the new pairs are labeled against A's no-passage term
        term = next(t for t in a_terms.values() if t["qid"] == q)
        assert b_view[(q, "p4")]["logp_without"] == pytest.approx(term["logp"][0], abs=1e-6)
    assert _snapshot(tmp_path / "run") == a_before  # A: read, never written (no part, no lease, no temp)
    # B is self-contained: with A gone it relabels nothing
    shutil.rmtree(tmp_path / "run")
    r = label.run(CFG, b)
    assert (r["reused"], r["new"], r["reused_from_other_run_dirs"], r["this_run"]["tokens"]) == (25, 0, {}, 0)
    assert _view(b) == b_view


# ------------------------------------------------------------------------------------------ without Ray (no labeling)
def _hand_cache(rd: RunDir, cfg: LabelConfig, *, duplicate: bool = False) -> dict[str, dict]:
    """Write a label cache for every current pair of ``rd`` under ``cfg`` (numbers made up, keys as the stage makes
    them) in two parts; ``duplicate``: one fingerprint twice, as two concurrent writers would leave it. Returns the
    rows by fingerprint."""
    from uae_ray.labeling.core import attach_fingerprints
    from uae_ray.labeling.fingerprint import settings_key
    from uae_ray.labeling.prompts import prompt_version_for
    from uae_ray.stages import label

    queries, pairs, _ = label.select_pairs(rd, cfg)
    settings = settings_key(cfg, cfg.dtype)
    pairs = attach_fingerprints(pairs, queries, aggregate=cfg.answer_aggregate, settings=settings)
    empty = {q for q, a in zip(queries["qid"].to_pylist(), queries["answers"].to_pylist(), strict=True)
             if not any(x.strip() for x in a)}
    rows = []
    for i, (qid, pid, fp) in enumerate(zip(*(pairs[c].to_pylist() for c in ("qid", "pid", "fingerprint")),
                                           strict=True)):
        skip = "empty_answer" if qid in empty else ""
        lw, lo = (float("nan"), float("nan")) if skip else (-1.0 - i / 64, -2.0)
        rows.append({"fingerprint": fp, "qid": qid, "pid": pid, "logp_with": lw, "logp_without": lo,
                     "n_answer_tokens": 0 if skip else 2, "utility": lw - lo, "skip_reason": skip,
                     "generator": cfg.generator, "prompt_version": prompt_version_for(cfg), "settings": settings})
    table = pa.Table.from_pylist(rows, schema=LABEL_CACHE_SCHEMA)
    parts = label.PartWriter(rd, LABEL_CACHE, "20240101T000000-0000aaaa")
    half = table.num_rows // 2
    parts.write(table.slice(0, half))
    parts.write(pa.concat_tables([table.slice(half), table.slice(0, 1)]) if duplicate else table.slice(half))
    return {r["fingerprint"]: r for r in rows}


def test_reuse_from_copies_another_run_dirs_labels_into_this_cache(tmp_path) -> None:
    from uae_ray.stages import label

    a, _ = write_label_run(tmp_path / "a", n_queries=4)
    made = _hand_cache(a, CFG, duplicate=True)
    a_before = _snapshot(tmp_path / "a")
    b, _ = write_label_run(tmp_path / "b", n_queries=4)  # the same questions and passages
    cfg = CFG.model_copy(update={"reuse_from": [str(tmp_path / "a")]})
    r = label.run(cfg, b)  # every pair is in A: nothing pending, no actor started
    a_dir = str((tmp_path / "a").resolve())
    assert r["reused_from_other_run_dirs"] == {a_dir: N_PAIRS}
    assert (r["pairs"], r["reused"], r["new"], r["unaccounted"]) == (N_PAIRS, N_PAIRS, 0, 0)
    assert (r["labeled"], r["skipped"]) == (12, {"empty_answer": 4})
    assert r["this_run"]["labeled"] == 0 and r["this_run"]["tokens"] == 0
    assert r["this_run"]["baseline"] == {"needed": 0, "reused": 0, "new": 0, "from_other_run_dirs": 0}
    assert r["cache"] == {"rows": N_PAIRS, "orphaned": 0, "orphaned_other_settings": 0}
    # copied into B's own cache, once per fingerprint (A's duplicate row dropped), in parts of rows_per_part (5)
    parts = b.listdir(LABEL_CACHE)
    assert len(parts) == 4 and all(p.startswith(f"part-{r['this_run']['writer']}-") for p in parts)
    cache = label.read_parts(b, LABEL_CACHE, LABEL_CACHE_SCHEMA)
    assert sorted(cache["fingerprint"].to_pylist()) == sorted(made)
    util = b.read_table(UTILITIES).to_pylist()
    assert len(util) == 12 and all(row["utility"] == pytest.approx(made[row["fingerprint"]]["utility"]) for row in util)
    assert _snapshot(tmp_path / "a") == a_before  # A: read only
    # a rerun finds everything in B's own cache: nothing copied again
    r = label.run(cfg, b)
    assert (r["reused"], r["new"], r["reused_from_other_run_dirs"]) == (N_PAIRS, 0, {a_dir: 0})
    assert b.listdir(LABEL_CACHE) == parts
    # B stands alone: A gone (and dropped from reuse_from), nothing to label
    shutil.rmtree(tmp_path / "a")
    r = label.run(CFG, b)
    assert (r["reused"], r["new"], r["reused_from_other_run_dirs"]) == (N_PAIRS, 0, {})
    # naming the run dir itself is harmless: its own cache is read anyway
    r = label.run(CFG.model_copy(update={"reuse_from": [str(tmp_path / "b")]}), b)
    assert (r["reused"], r["reused_from_other_run_dirs"]) == (N_PAIRS, {})


def test_reuse_from_that_is_missing_or_unlabeled_is_an_error_naming_it(tmp_path) -> None:
    from uae_ray.stages import label

    b, _ = write_label_run(tmp_path / "b", n_queries=2)
    missing = tmp_path / "no-such-run"
    with pytest.raises(FileNotFoundError, match=re.escape(f"run dir '{missing}' does not exist")):
        label.run(CFG.model_copy(update={"reuse_from": [str(missing)]}), b)
    assert not missing.exists()  # opened read only: nothing created
    write_label_run(tmp_path / "bare", n_queries=2)  # never labeled
    with pytest.raises(FileNotFoundError, match=re.escape(f"run dir '{tmp_path / 'bare'}' has no labels in "
                                                          f"{LABEL_CACHE}/")):
        label.run(CFG.model_copy(update={"reuse_from": [str(tmp_path / "bare")]}), b)
    assert not b.exists(LABEL_CACHE) and not b.exists(UTILITIES)  # the error came before any work
    assert not (tmp_path / "bare" / LABEL_CACHE).exists()


def test_budget_labels_only_the_first_documents_and_reports_them(tmp_path) -> None:
    from uae_ray.stages import label

    a, _ = write_label_run(tmp_path / "a", n_queries=4)
    _hand_cache(a, CFG)
    b, _ = write_label_run(tmp_path / "b", n_queries=4)  # q_i asks about document d_i; the corpus is d0..d5
    queries, pairs, budget = label.select_pairs(b, CFG.model_copy(update={"max_docs_per_split": 2}))
    assert queries["qid"].to_pylist() == ["q0", "q1"] and pairs.num_rows == 8
    assert set(pairs["qid"].to_pylist()) == {"q0", "q1"}
    assert budget == {"max_docs_per_split": 2, "splits": {"train": {
        "documents": 2, "documents_total": 4, "queries": 2, "queries_total": 4, "pairs": 8, "pairs_total": 16}}}
    cfg = CFG.model_copy(update={"max_docs_per_split": {"train": 2}, "reuse_from": [str(tmp_path / "a")]})
    r = label.run(cfg, b)
    assert r["budget"]["max_docs_per_split"] == {"train": 2} and r["budget"]["splits"]["train"]["pairs"] == 8
    assert (r["pairs"], r["reused"], r["new"]) == (8, 8, 0)  # out-of-budget pairs: neither labeled nor skipped
    assert r["reused_from_other_run_dirs"] == {str((tmp_path / "a").resolve()): 8}
    assert r["skipped"] == {} and b.read_table(LABEL_SKIPPED).num_rows == 0
    assert label.read_parts(b, LABEL_CACHE, LABEL_CACHE_SCHEMA).num_rows == 8  # only what the budget needs is copied
    assert {row["qid"] for row in b.read_table(UTILITIES).to_pylist()} == {"q0", "q1"}
    # no budget: every pair, in the report as all of them
    r = label.run(CFG.model_copy(update={"reuse_from": [str(tmp_path / "a")]}), b)
    assert r["budget"] == {"max_docs_per_split": None, "splits": {"train": {
        "documents": 4, "documents_total": 4, "queries": 4, "queries_total": 4, "pairs": 16, "pairs_total": 16}}}
    assert (r["pairs"], r["reused"], r["reused_from_other_run_dirs"]) == (16, 16, {str((tmp_path / "a").resolve()): 8})


def test_reuse_from_an_object_store_run_dir(s3_endpoint, s3_run_uri, tmp_path, monkeypatch) -> None:
    """A ``reuse_from`` entry on S3 (a real S3 endpoint): read there, copied here; an entry that names no endpoint
    takes this run dir's (from its storage options, here with no AWS_ENDPOINT_URL in the environment)."""
    from uae_ray.runtime import StorageOptions
    from uae_ray.stages import label

    a_uri = f"{s3_run_uri}-a"
    a, _ = write_label_run(a_uri, n_queries=4)  # RunDir takes a URI as well as a path
    made = _hand_cache(a, CFG)
    a_parts = a.listdir(LABEL_CACHE)
    b, _ = write_label_run(tmp_path / "b", n_queries=4)
    r = label.run(CFG.model_copy(update={"reuse_from": [a_uri]}), b)
    assert (r["reused"], r["new"], r["reused_from_other_run_dirs"]) == (N_PAIRS, 0, {a_uri: N_PAIRS})
    assert sorted(label.read_parts(b, LABEL_CACHE, LABEL_CACHE_SCHEMA)["fingerprint"].to_pylist()) == sorted(made)
    assert a.listdir(LABEL_CACHE) == a_parts and not a.exists(UTILITIES)  # A: read only
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    c = RunDir(f"{s3_run_uri}-c", StorageOptions(endpoint_url=s3_endpoint))
    assert "endpoint_override" in label.other_uri(a_uri, c) and "endpoint_override" not in label.other_uri(a_uri)
    for name in (CORPUS, QUERIES, CANDIDATES):
        c.write_table(name, a.read_table(name))
    r = label.run(CFG.model_copy(update={"reuse_from": [a_uri]}), c)
    assert (r["reused"], r["new"], r["reused_from_other_run_dirs"]) == (N_PAIRS, 0, {a_uri: N_PAIRS})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        label.run(CFG.model_copy(update={"reuse_from": [f"{s3_run_uri}-nothing"]}), c)
