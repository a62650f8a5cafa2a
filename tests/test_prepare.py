"""Windowing, splits and the prepare stage: fixtures through the stage and the CLI, and the real shared data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from uae_ray.cli import main
from uae_ray.config import PrepareConfig, SplitRatios
from uae_ray.data import schema
from uae_ray.data.chunking import Windower, gold_windows
from uae_ray.data.loaders import DataError
from uae_ray.data.splits import split_for_document
from uae_ray.runtime import RunDir
from uae_ray.stages import prepare

DATA = Path(__file__).resolve().parent / "fixtures" / "data"
LONG = ("The encoder reads every sentence of the document and builds a representation for each token. Tokens are "
        "linked when they share an entity, when they are adjacent, or when a parser connects them.")


@pytest.fixture(scope="module")
def windower() -> Windower:
    return Windower("all-minilm-l6-v2", max_tokens=16, overlap=4)


def test_windows_fit_the_encoder_and_overlap(windower):
    short, long = windower.split(["A short passage.", LONG])
    assert [w.text for w in short] == ["A short passage."] and short[0].n_tokens == 4
    assert len(long) > 2
    for w in long:
        assert len(windower.tokenizer.encode(w.text).ids) <= 16  # with [CLS]/[SEP]: never truncated by the encoder
        assert w.text in LONG and w.n_tokens <= 14
    ids = [windower.tokenizer.encode(w.text, add_special_tokens=False).ids for w in long]
    for a, b in itertools.pairwise(ids):
        assert a[-4:] == b[:4]  # consecutive windows share `overlap` tokens
    assert long[0].text.startswith("The encoder") and long[-1].text.endswith("connects them.")
    full = windower.tokenizer.encode(LONG, add_special_tokens=False).ids
    assert sum(w.n_tokens for w in long) - 4 * (len(long) - 1) == len(full)


def test_gold_windows_marks_span_or_falls_back():
    windows = ["alpha beta", "beta Graph  Attention", "gamma"]
    assert gold_windows(windows, ("graph attention",)) == ([1], False)
    assert gold_windows(windows, ("beta",)) == ([0, 1], False)
    assert gold_windows(windows, ("delta",)) == ([0, 1, 2], True)
    assert gold_windows(windows, ()) == ([0, 1, 2], True)
    assert gold_windows(["only"], ("absent",)) == ([0], False)


def test_splits_are_deterministic_by_document():
    ratios = SplitRatios(train=0.6, dev=0.2, test=0.2)
    docs = [f"doc{i}" for i in range(3000)]
    first = [split_for_document(d, ratios, 13) for d in docs]
    assert first == [split_for_document(d, ratios, 13) for d in docs]
    assert abs(first.count("train") / 3000 - 0.6) < 0.04 and abs(first.count("dev") / 3000 - 0.2) < 0.04
    assert first != [split_for_document(d, ratios, 14) for d in docs]
    assert {split_for_document(d, SplitRatios(train=1.0, dev=0.0, test=0.0), 13) for d in docs} == {"train"}


def _cfg(**kw) -> PrepareConfig:
    base = {"format": "qasper", "inputs": [{"path": str(DATA / "qasper_mini.json"), "split": "train"}],
            "max_passage_tokens": 32, "window_overlap": 8}
    return PrepareConfig.model_validate({**base, **kw})


def test_prepare_qasper_windows_gold_and_report(tmp_path, capsys):
    rd = RunDir(tmp_path / "run")
    summary = prepare.run(_cfg(), rd)
    corpus, queries = rd.read_table(schema.CORPUS), rd.read_table(schema.QUERIES)
    assert corpus.schema.equals(schema.CORPUS_SCHEMA) and queries.schema.equals(schema.QUERIES_SCHEMA)
    pids = corpus.column("pid").to_pylist()
    assert len(pids) == len(set(pids))
    long_windows = [p for p in pids if p.startswith("2001.00001#3.")]
    assert len(long_windows) >= 3  # the long Method paragraph, cut into windows
    assert max(corpus.column("n_tokens").to_pylist()) <= 30
    q = {r["qid"]: r for r in queries.to_pylist()}
    assert set(q) == {"q-layer", "q-data", "q-f1"}
    text = dict(zip(pids, corpus.column("text").to_pylist(), strict=True))
    layer_gold = q["q-layer"]["gold_pids"]
    assert layer_gold and set(layer_gold) < set(long_windows)  # only the windows holding the span stay gold
    assert all("graph attention network" in text[p] for p in layer_gold)
    assert q["q-data"]["gold_pids"] == ["2001.00001#2"] and q["q-f1"]["answers"] == ["71.2", "71.2, dev set"]
    assert {r["split"] for r in q.values()} == {"train"}
    report = rd.read_json(schema.PREPARE_REPORT)
    assert report["questions"] == {"read": 6, "kept": 3, "skipped": {
        "evidence_not_found": 1, "no_answerable_annotation": 1, "no_text_evidence": 1}}
    assert report["passages"] == {"read": 7, "kept": 6, "skipped": {"empty_text": 1}}
    assert report["windows"]["rows"] == corpus.num_rows and report["windows"]["gold_pairs_in_split_passages"] == 1
    assert report["splits"]["train"] == {"queries": 3, "documents": 2}
    assert summary["questions_kept"] == 3 and "up_to_date" not in summary
    assert rd.local_path(prepare.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "skipped no_text_evidence: 1" in capsys.readouterr().out
    # another config -> redone (whether a rerun is needed at all is the pipeline's rule: tests/test_pipeline.py)
    assert prepare.run(_cfg(require_gold=False), rd)["questions_kept"] == 5


def test_prepare_without_required_gold_and_max_docs(tmp_path):
    rd = RunDir(tmp_path / "run")
    prepare.run(_cfg(require_gold=False, inputs=[{"path": str(DATA / "qasper_mini.json")}]), rd)
    q = {r["qid"]: r for r in rd.read_table(schema.QUERIES).to_pylist()}
    assert q["q-float"]["gold_pids"] == [] and q["q-float"]["answers"] == ["Yes"]
    splits = {r["doc_id"]: r["split"] for r in q.values()}
    assert splits == {d: split_for_document(d, SplitRatios(), 13) for d in splits}
    rd2 = RunDir(tmp_path / "run2")
    prepare.run(_cfg(max_docs_per_split=1, inputs=[{"path": str(DATA / "qasper_mini.json"), "split": "dev"}]), rd2)
    report = rd2.read_json(schema.PREPARE_REPORT)
    assert report["splits"]["dev"]["documents"] == 1
    assert report["questions"]["skipped"]["max_docs_per_split"] == 2 and report["questions"]["kept"] == 2
    assert set(rd2.read_table(schema.CORPUS).column("doc_id").to_pylist()) == {"2001.00001"}
    # a cap per split: dev capped at 1 document, train (not named) uncapped
    rd3 = RunDir(tmp_path / "run3")
    prepare.run(_cfg(max_docs_per_split={"dev": 1}, inputs=[{"path": str(DATA / "qasper_mini.json"), "split": "dev"}]),
                rd3)
    assert rd3.read_json(schema.PREPARE_REPORT)["splits"]["dev"]["documents"] == 1
    rd4 = RunDir(tmp_path / "run4")
    dev_only = [{"path": str(DATA / "qasper_mini.json"), "split": "dev"}]
    prepare.run(_cfg(max_docs_per_split={"train": 1}, inputs=dev_only), rd4)
    assert "max_docs_per_split" not in rd4.read_json(schema.PREPARE_REPORT)["questions"]["skipped"]
    assert rd4.read_json(schema.PREPARE_REPORT)["splits"]["dev"]["documents"] == 2
    rd5 = RunDir(tmp_path / "run5")  # at most one question per document; the rest are counted, not lost silently
    prepare.run(_cfg(max_queries_per_doc=1, inputs=dev_only), rd5)
    rep5 = rd5.read_json(schema.PREPARE_REPORT)["questions"]
    q5 = rd5.read_table(schema.QUERIES).to_pylist()
    assert len({r["doc_id"] for r in q5}) == len(q5) == rep5["kept"] == 2
    assert rep5["skipped"]["max_queries_per_doc"] == 1  # 3 questions with gold in 2 documents


def test_prepare_errors_across_inputs_write_nothing(tmp_path):
    rd = RunDir(tmp_path / "run")
    twice = _cfg(inputs=[{"path": str(DATA / "qasper_mini.json")}, {"path": str(DATA / "qasper_mini.json")}])
    with pytest.raises(DataError, match=r"duplicate passage id '2001\.00001#0'"):
        prepare.run(twice, rd)
    assert not rd.exists(schema.CORPUS) and not rd.exists(schema.PREPARE_REPORT)
    conflict = tmp_path / "conflict.jsonl"
    conflict.write_text(
        '{"pid": "p", "doc_id": "d", "text": "Some text."}\n'
        '{"qid": "a", "question": "Q1", "answers": ["x"], "split": "train", "gold_pids": ["p"]}\n'
        '{"qid": "b", "question": "Q2", "answers": ["x"], "split": "dev", "gold_pids": ["p"]}\n')
    with pytest.raises(DataError, match=r"line 3: field 'split': 'dev' but query 'a' of the same document 'd'"):
        prepare.run(PrepareConfig(format="jsonl", inputs=[{"path": str(conflict)}]), rd)


@pytest.mark.parametrize(
    ("fmt", "input_arg", "kept"),
    [
        ("qasper", f"dev={DATA / 'qasper_mini.json'}", 3),
        ("mrqa", str(DATA / "mrqa_mini.jsonl"), 3),
        ("squad", f"test={DATA / 'squad_v2_mini.json'}", 4),
        ("jsonl", str(DATA / "generic_mini.jsonl"), 3),
    ],
)
def test_cli_prepare_each_format(tmp_path, capsys, fmt, input_arg, kept):
    run_dir = tmp_path / fmt
    rc = main(["prepare", "--run-dir", str(run_dir), "--format", fmt, "--input", input_arg,
               "--set", "max_passage_tokens=64", "--set", "window_overlap=16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"prepare ({fmt}):" in out and json.loads(out[out.index("{"):])["questions_kept"] == kept
    assert pq.read_table(run_dir / schema.QUERIES).num_rows == kept
    corpus = pq.read_table(run_dir / schema.CORPUS)
    assert corpus.num_rows > 0 and max(corpus.column("n_tokens").to_pylist()) <= 62
    report = json.loads((run_dir / schema.PREPARE_REPORT).read_text())
    assert report["format"] == fmt and report["questions"]["kept"] == kept


def test_cli_prepare_hf_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"qid": f"h{i}", "question": f"Question {i}?", "answers": [f"answer {i}"],
             "passages": [{"text": f"The answer {i} is here.", "gold": True}]} for i in range(20)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    rc = main(["prepare", "--run-dir", str(tmp_path / "run"), "--format", "hf", "--hf-dataset", str(tmp_path / "ds"),
               "--set", "hf_layout=generic"])
    assert rc == 0
    queries = pq.read_table(tmp_path / "run" / schema.QUERIES)
    assert queries.num_rows == 20 and set(queries.column("split").to_pylist()) <= {"train", "dev", "test"}
    # the saved folder changed -> prepared again, not "up to date"
    datasets.Dataset.from_list(rows[:5]).save_to_disk(str(tmp_path / "ds"))
    cfg = PrepareConfig(format="hf", hf_dataset=str(tmp_path / "ds"), hf_layout="generic")
    assert prepare.run(cfg, RunDir(tmp_path / "run"))["questions_kept"] == 5


@pytest.mark.shared_data
def test_prepare_real_qasper_dev_and_squad_mrqa(tmp_path, shared_data):
    """Counts against ../shared/data/README.md: 1,005 QASPER dev questions, 892 with text evidence (>= 880 resolved),
    10,507 SQuAD questions."""
    rd = RunDir(tmp_path / "qasper")
    prepare.run(PrepareConfig(format="qasper", inputs=[{"path": str(shared_data / "qasper/qasper-dev-v0.3.json"),
                                                         "split": "dev"}]), rd)
    report = rd.read_json(schema.PREPARE_REPORT)
    assert report["questions"]["read"] == 1005
    assert report["passages"]["read"] == 13267
    assert report["notes"]["qasper_questions_with_text_evidence"] == 892
    assert report["notes"]["qasper_text_evidence_resolved"] >= 880
    assert report["questions"]["kept"] == report["notes"]["qasper_text_evidence_resolved"]
    assert report["splits"]["dev"]["documents"] == 281
    queries = rd.read_table(schema.QUERIES)
    assert all(len(g) > 0 for g in queries.column("gold_pids").to_pylist())

    rd = RunDir(tmp_path / "squad")
    squad = shared_data / "squad/SQuAD-dev-v1.1.mrqa.jsonl.gz"
    prepare.run(PrepareConfig(format="mrqa", inputs=[{"path": str(squad)}]), rd)
    report = rd.read_json(schema.PREPARE_REPORT)
    assert report["questions"]["read"] == 10507 and report["questions"]["kept"] == 10507
    assert report["passages"]["read"] == 2067
    queries = rd.read_table(schema.QUERIES).to_pylist()
    corpus = rd.read_table(schema.CORPUS)
    doc_split = {}
    for q in queries:  # by document: every question of a paragraph in the same split
        assert doc_split.setdefault(q["doc_id"], q["split"]) == q["split"]
    assert {s for s in doc_split.values()} == {"train", "dev", "test"}
    assert set(corpus.column("doc_id").to_pylist()) == set(doc_split)


def test_prepare_without_usable_questions_fails(tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_text('{"pid": "p", "text": "A passage."}\n'
                    '{"qid": "a", "question": "Q?", "answers": [], "gold_pids": ["p"]}\n')
    with pytest.raises(DataError, match=r"none.jsonl: no usable questions: 1 read, skipped \{'no_answer': 1\}"):
        prepare.run(PrepareConfig(format="jsonl", inputs=[{"path": str(path)}]), RunDir(tmp_path / "run"))
    assert not (tmp_path / "run" / schema.CORPUS).exists()


def test_prepare_duplicate_question_id_is_fatal(tmp_path):
    path = tmp_path / "dup.jsonl"
    line = '{"id": "", "context": "CONTEXT", "qas": [{"qid": "same", "question": "Q?", "answers": ["x"]}]}\n'
    path.write_text(line.replace("CONTEXT", "One context.") + line.replace("CONTEXT", "Another context."))
    with pytest.raises(DataError, match=r"dup.jsonl: line 2 / qas\[0\]: field 'qid': duplicate question id 'same'"):
        prepare.run(PrepareConfig(format="mrqa", inputs=[{"path": str(path)}]), RunDir(tmp_path / "run"))
