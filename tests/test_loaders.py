"""Loaders on hand-written fixtures (tests/fixtures/data): what each format yields, and each bad-input error."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uae_ray.data.loaders import Chunk, DataError, LoadStats
from uae_ray.data.loaders.generic import load_generic
from uae_ray.data.loaders.hf import load_hf
from uae_ray.data.loaders.jsonstream import iter_json_object
from uae_ray.data.loaders.mrqa import load_mrqa
from uae_ray.data.loaders.qasper import load_qasper
from uae_ray.data.loaders.squad import load_squad

DATA = Path(__file__).resolve().parent / "fixtures" / "data"


def _all(chunks) -> tuple[dict, dict]:
    chunks = list(chunks)
    assert all(isinstance(c, Chunk) for c in chunks)
    passages = {p.pid: p for c in chunks for p in c.passages}
    queries = {q.qid: q for c in chunks for q in c.queries}
    return passages, queries


# ------------------------------------------------------------------------------------------------------------ QASPER
def test_qasper_passages_answers_and_gold():
    stats = LoadStats()
    passages, queries = _all(load_qasper(DATA / "qasper_mini.json", "dev", stats))
    # paragraphs keep their position in the paper; the empty one (#1) is skipped and counted; no abstract passage
    assert sorted(passages) == ["2001.00001#0", "2001.00001#2", "2001.00001#3", "2001.00001#4",
                                "2001.00002#0", "2001.00002#1"]
    assert stats.passages_read == 7 and stats.passages_skipped == {"empty_text": 1}
    assert passages["2001.00002#0"].title == "Official Layout With Every Field"
    assert stats.queries_read == 6
    assert stats.skipped == {"no_answerable_annotation": 1}  # q-unans
    assert set(queries) == {"q-layer", "q-data", "q-float", "q-f1", "q-section"}
    q = queries["q-layer"]
    assert q.answers == ("graph attention network",) and q.gold_pids == ("2001.00001#3",)
    assert q.match_texts == ("graph attention network",) and q.split == "dev" and q.doc_id == "2001.00001"
    # free-form answer; evidence matches only after whitespace normalisation; unanswerable annotation ignored
    assert queries["q-data"].answers == ("the SQuAD dataset",)
    assert queries["q-data"].gold_pids == ("2001.00001#2",)
    assert stats.notes["qasper_evidence_matched_after_whitespace_normalisation"] == 1
    # yes/no answer with figure-only evidence: kept by the loader, no gold, reason given
    assert queries["q-float"].answers == ("Yes",)
    assert queries["q-float"].gold_pids == () and queries["q-float"].no_gold_reason == "no_text_evidence"
    # official layout (filled worker ids, highlighted evidence): spans joined, answers de-duplicated per annotation
    assert queries["q-f1"].answers == ("71.2", "71.2, dev set") and queries["q-f1"].gold_pids == ("2001.00002#0",)
    assert queries["q-section"].no_gold_reason == "evidence_not_found"
    assert stats.notes["qasper_questions_with_text_evidence"] == 4
    assert stats.notes["qasper_text_evidence_resolved"] == 3


def test_json_object_stream_matches_json_load_with_tiny_reads():
    path = DATA / "qasper_mini.json"
    expected = json.loads(path.read_text())
    streamed = {k: v for k, v, _ in iter_json_object(path, read_chars=7)}
    assert streamed == expected
    lines = [line for _, _, line in iter_json_object(path)]
    assert lines[0] == 2 and lines[1] > lines[0]


@pytest.mark.parametrize(
    ("name", "where", "field", "message"),
    [
        ("qasper_missing_question_id.json", "paper 2001.00002", "question_id", "missing"),
        ("qasper_paragraphs_not_list.json", "paper 2001.00001", "full_text[1].paragraphs", "expected a list"),
        ("qasper_truncated.json", "line", "2001.00002", "invalid JSON"),
        ("qasper_duplicate_paper.json", "line 2", "p1", "duplicate key"),
    ],
)
def test_qasper_bad_input_names_file_record_and_field(name, where, field, message):
    with pytest.raises(DataError) as err:
        list(load_qasper(DATA / name, None, LoadStats()))
    text = str(err.value)
    assert name in text and where in text and message in text
    assert err.value.field == field


def test_qasper_non_utf8_and_gzip(tmp_path):
    raw = (DATA / "qasper_mini.json").read_bytes()
    gz = tmp_path / "q.json.gz"
    gz.write_bytes(gzip.compress(raw))
    _, queries = _all(load_qasper(gz, None, LoadStats()))
    assert len(queries) == 5
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + raw)
    assert len(_all(load_qasper(bom, None, LoadStats()))[1]) == 5
    bad = tmp_path / "latin1.json"
    bad.write_bytes(raw.replace(b"Tiny Graphs", b"Tiny Gr\xe4phs"))
    with pytest.raises(DataError, match=r"latin1.json: byte offset \d+: not valid UTF-8"):
        list(load_qasper(bad, None, LoadStats()))


def test_qasper_empty_question_is_fatal(tmp_path):
    paper = json.loads((DATA / "qasper_mini.json").read_text())
    paper["2001.00002"]["qas"][1]["question"] = "  "
    path = tmp_path / "q.json"
    path.write_text(json.dumps(paper))
    with pytest.raises(DataError, match=r"paper 2001.00002 .* / qas\[1\]: field 'question': empty question"):
        list(load_qasper(path, None, LoadStats()))


# -------------------------------------------------------------------------------------------------------------- MRQA
@pytest.mark.parametrize("gz", [False, True])
def test_mrqa_contexts_are_documents(tmp_path, gz):
    path = DATA / "mrqa_mini.jsonl"
    if gz:
        path = tmp_path / "mini.jsonl.gz"
        path.write_bytes(gzip.compress((DATA / "mrqa_mini.jsonl").read_bytes()))
    stats = LoadStats()
    passages, queries = _all(load_mrqa(path, None, stats))
    assert len(passages) == 2 and all(pid.startswith("squad-") and pid.endswith("#0") for pid in passages)
    assert stats.queries_read == 4 and stats.skipped == {"no_answer": 1}
    q = queries["m1"]
    assert q.answers == ("Denver Broncos", "the Denver Broncos")  # `answers`, de-duplicated
    assert q.gold_pids == (f"{q.doc_id}#0",) and q.split is None
    assert queries["m3"].doc_id != q.doc_id
    # stable ids: the same file gives the same pids
    assert sorted(_all(load_mrqa(path, None, LoadStats()))[0]) == sorted(passages)


def test_mrqa_bad_inputs(tmp_path):
    with pytest.raises(DataError, match=r"mrqa_missing_context.jsonl: line 2: field 'context': missing"):
        list(load_mrqa(DATA / "mrqa_missing_context.jsonl", None, LoadStats()))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"header": {}}\n{"context": "c", "qas": [{"qid": "a", "question": "Q", "answers": ["x"]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: invalid JSON"):
        list(load_mrqa(bad, None, LoadStats()))


# ------------------------------------------------------------------------------------------------------------- SQuAD
def test_squad_v2_offsets_impossible_and_articles():
    stats = LoadStats()
    passages, queries = _all(load_squad(DATA / "squad_v2_mini.json", "train", stats))
    assert sorted(passages) == ["Computational_complexity#0", "Normans#0", "Normans#1"]
    assert stats.skipped == {"impossible": 1}
    assert queries["s-country"].answers == ("France",) and queries["s-country"].gold_pids == ("Normans#0",)
    assert stats.notes["squad_answer_offset_wrong"] == 2  # s-country's second offset, s-elsewhere's
    assert stats.notes["squad_answer_not_in_context"] == 1  # s-elsewhere: kept, gold is its own paragraph
    assert queries["s-elsewhere"].gold_pids == ("Normans#1",)
    assert queries["s-cc"].doc_id == "Computational_complexity"


def test_squad_bad_id_type():
    with pytest.raises(DataError, match=r"data\[0\].paragraphs\[0\].qas\[0\]: field 'id': expected a string, got int"):
        list(load_squad(DATA / "squad_id_not_string.json", None, LoadStats()))


# ----------------------------------------------------------------------------------------------------------- generic
def _check_generic(passages, queries, stats):
    assert set(passages) == {"doc1#0", "doc1#1", "loose", "g3#0", "g3#1", "shared"}
    assert passages["loose"].doc_id == "loose" and passages["g3#0"].doc_id == "g3"
    assert stats.skipped == {"no_answer": 1}  # g4
    assert queries["g1"].doc_id == "doc1" and queries["g1"].split == "train"  # doc_id from the gold passage
    assert queries["g2"].split is None
    assert queries["g3"].gold_pids == ("g3#0",) and queries["g3"].answers == ("Ada Lind", "Lind")
    assert queries["g5"].gold_pids == () and queries["g5"].no_gold_reason == "no_gold_marked"


def test_generic_jsonl(tmp_path):
    stats = LoadStats()
    passages, queries = _all(load_generic(DATA / "generic_mini.jsonl", None, stats))
    _check_generic(passages, queries, stats)
    assert stats.queries_read == 5 and stats.passages_read == 6
    bom = tmp_path / "bom.jsonl"  # a byte-order mark, as some editors write
    bom.write_bytes(b"\xef\xbb\xbf" + (DATA / "generic_mini.jsonl").read_bytes())
    stats = LoadStats()
    _check_generic(*_all(load_generic(bom, None, stats)), stats)


def test_generic_parquet_same_as_jsonl(tmp_path):
    rows = [json.loads(line) for line in (DATA / "generic_mini.jsonl").read_text().splitlines()]
    path = tmp_path / "mini.parquet"
    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist takes its columns from the first row
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    stats = LoadStats()
    passages, queries = _all(load_generic(path, None, stats))
    _check_generic(passages, queries, stats)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("generic_bad_utf8.jsonl", r"line 2: not valid UTF-8"),
        ("generic_bad_json.jsonl", r"line 2: invalid JSON"),
        ("generic_duplicate_pid.jsonl", r"line 2: field 'pid': duplicate passage pid 'p1' \(first at line 1\)"),
        ("generic_empty_question.jsonl", r"line 2: field 'question': empty question"),
        ("generic_answers_not_list.jsonl", r"line 2: field 'answers': expected a list, got str"),
        ("generic_unknown_gold.jsonl", r"line 2: field 'gold_pids': unknown passage pid 'p2'"),
    ],
)
def test_generic_bad_inputs(name, pattern):
    with pytest.raises(DataError, match=rf"{name}: {pattern}"):
        list(load_generic(DATA / name, None, LoadStats()))


def test_generic_record_level_errors(tmp_path):
    cases = {
        '{"qid": "a", "question": "Q", "answers": ["x"]}': "give exactly one of gold_pids and passages",
        '{"qid": "a", "question": "Q", "answers": ["x"], "split": "val", "gold_pids": ["p"]}': "must be one of",
        '{"qid": "a", "question": "Q", "answers": ["x"], "passages": [{"title": "t"}]}': "passages[0].text': missing",
        '[1, 2]': "expected a JSON object, got list",
    }
    for i, (line, message) in enumerate(cases.items()):
        path = tmp_path / f"case{i}.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(DataError) as err:
            list(load_generic(path, None, LoadStats()))
        assert message in str(err.value) and "line 1" in str(err.value)
    dup = tmp_path / "dupq.jsonl"
    query = '{"qid": "a", "question": "Q", "answers": ["x"], "gold_pids": ["p"]}\n'
    dup.write_text('{"pid": "p", "text": "t"}\n' + query * 2)
    with pytest.raises(DataError, match=r"line 3: field 'qid': duplicate qid 'a' \(first at line 2\)"):
        list(load_generic(dup, None, LoadStats()))


# ---------------------------------------------------------------------------------------------------- HF datasets
def _hub_qasper_rows() -> list[dict]:
    """The fixture papers laid out as allenai/qasper hub rows (nested sequences column-wise)."""
    rows = []
    for paper_id, paper in json.loads((DATA / "qasper_mini.json").read_text()).items():
        qas = paper["qas"]
        rows.append({
            "id": paper_id, "title": paper["title"], "abstract": paper["abstract"],
            "full_text": {"section_name": [s["section_name"] for s in paper["full_text"]],
                          "paragraphs": [s["paragraphs"] for s in paper["full_text"]]},
            "qas": {"question": [q["question"] for q in qas], "question_id": [q["question_id"] for q in qas],
                    "answers": [{"answer": [a["answer"] for a in q["answers"]],
                                 "annotation_id": [a["annotation_id"] for a in q["answers"]],
                                 "worker_id": [a["worker_id"] for a in q["answers"]]} for q in qas]},
        })
    return rows


def _hub_qasper_features(datasets):
    """The allenai/qasper hub features (its loading script), where Sequence of a dict is stored column-wise."""
    v, seq = datasets.Value, datasets.Sequence
    answer = {"unanswerable": v("bool"), "extractive_spans": seq(v("string")), "yes_no": v("bool"),
              "free_form_answer": v("string"), "evidence": seq(v("string")), "highlighted_evidence": seq(v("string"))}
    return datasets.Features({
        "id": v("string"), "title": v("string"), "abstract": v("string"),
        "full_text": seq({"section_name": v("string"), "paragraphs": [v("string")]}),
        "qas": seq({"question": v("string"), "question_id": v("string"),
                    "answers": seq({"answer": answer, "annotation_id": v("string"), "worker_id": v("string")})}),
    })


def test_hf_saved_dataset_qasper_layout(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows, features = _hub_qasper_rows(), _hub_qasper_features(datasets)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1], features=features),
                               "validation": datasets.Dataset.from_list(rows[1:], features=features)})
    dd.save_to_disk(str(tmp_path / "qasper_hf"))
    stats = LoadStats()
    chunks = list(load_hf(str(tmp_path / "qasper_hf"), None, "qasper", None, stats))
    passages, queries = _all(chunks)
    # the same result as the official file, with hub split names mapped to ours
    ref_stats = LoadStats()
    ref_passages, ref_queries = _all(load_qasper(DATA / "qasper_mini.json", None, ref_stats))
    assert sorted(passages) == sorted(ref_passages)
    assert {k: (q.answers, q.gold_pids) for k, q in queries.items()} == {
        k: (q.answers, q.gold_pids) for k, q in ref_queries.items()}
    assert stats.skipped == ref_stats.skipped
    assert [c.split for c in chunks] == ["train", "dev"]


def test_hf_saved_dataset_generic_and_missing(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"qid": "h1", "question": "Who painted it?", "answers": ["Ada"], "split": None,
             "passages": [{"text": "Ada painted it.", "gold": True}, {"text": "Nobody else did.", "gold": False}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "gen"))
    passages, queries = _all(load_hf(str(tmp_path / "gen"), None, "generic", None, LoadStats()))
    assert queries["h1"].gold_pids == ("h1#0",) and len(passages) == 2 and queries["h1"].split is None
    shutil.rmtree(tmp_path / "gen")
    with pytest.raises(DataError, match="could not load the dataset"):
        list(load_hf(str(tmp_path / "no-such-org/no-such-dataset"), None, "generic", None, LoadStats()))


# ------------------------------------------------------------------------------ remaining bad inputs, MRQA and SQuAD
_MRQA_OK = ('{"id": "", "context": "Paris is in France.", '
            '"qas": [{"qid": "a", "question": "Where?", "answers": ["France"]}]}')


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (b'{"header": {"dataset": "X"}}\n{"context": "caf\xe9", "qas": []}\n', r"line 2: not valid UTF-8"),
        (_MRQA_OK.replace('"Where?"', '"  "').encode(), r"line 1 / qas\[0\]: field 'question': empty question"),
        (_MRQA_OK.replace('["France"]', '"France"').encode(),
         r"line 1 / qas\[0\]: field 'answers': expected a list, got str"),
        (_MRQA_OK.replace('"qas": [', '"qas": [1, ').encode(), r"line 1 / qas\[0\]: expected an object, got int"),
    ],
)
def test_mrqa_more_bad_inputs(tmp_path, body, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"bad.jsonl: {pattern}"):
        list(load_mrqa(path, None, LoadStats()))


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (b'{"data": [{"title": "T", "paragraphs": [{"context": "\xff", "qas": []}]}]}', r"line 1: not valid UTF-8"),
        (b'{"data": [{"title": "T",\n "paragraphs": [}]}', r"line 2: invalid JSON"),
        (b'{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "a", "question": ""}]}]}]}',
         r"data\[0\].paragraphs\[0\].qas\[0\]: field 'question': empty question"),
        (b'{"data": {"title": "T"}}', r"top level: field 'data': expected a list, got dict"),
    ],
)
def test_squad_more_bad_inputs(tmp_path, body, pattern):
    path = tmp_path / "bad.json"
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"bad.json: {pattern}"):
        list(load_squad(path, None, LoadStats()))


def test_hf_saved_dataset_squad_layout(tmp_path):
    datasets = pytest.importorskip("datasets")
    v = datasets.Value
    features = datasets.Features({"id": v("string"), "title": v("string"), "context": v("string"),
                                  "question": v("string"),
                                  "answers": datasets.Sequence({"text": v("string"), "answer_start": v("int32")})})
    ctx_a, ctx_b = "Rollo was the first ruler of Normandy.", "Normandy is a region in France."
    rows = [
        {"id": "r1", "title": "Normans", "context": ctx_a, "question": "Who ruled first?",
         "answers": {"text": ["Rollo"], "answer_start": [0]}},
        {"id": "r2", "title": "Normans", "context": ctx_a, "question": "Ruler of what?",
         "answers": {"text": ["Normandy"], "answer_start": [29]}},
        {"id": "r3", "title": "Normans", "context": ctx_b, "question": "In which country?",
         "answers": {"text": ["France"], "answer_start": [0]}},  # wrong offset: counted, located by text
        {"id": "r4", "title": "Normans", "context": ctx_b, "question": "Who painted it?",
         "answers": {"text": [], "answer_start": []}},  # squad_v2 style impossible question
    ]
    other = {"id": "t1", "title": "Other", "context": "Oslo is in Norway.", "question": "Where is Oslo?",
             "answers": {"text": ["Norway"], "answer_start": [11]}}
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows, features=features),
                          "train": datasets.Dataset.from_list([other], features=features)}).save_to_disk(
        str(tmp_path / "sq"))
    stats = LoadStats()
    chunks = list(load_hf(str(tmp_path / "sq"), None, "squad", None, stats))
    passages, queries = _all(chunks)
    assert sorted(passages) == ["Normans#0", "Normans#1", "Other#0"] and passages["Normans#1"].text == ctx_b
    assert queries["r2"].gold_pids == ("Normans#0",) and queries["r3"].gold_pids == ("Normans#1",)
    assert stats.skipped == {"no_answer": 1} and stats.notes["squad_answer_offset_wrong"] == 1
    assert {c.passages[0].doc_id: c.split for c in chunks} == {"Normans": "dev", "Other": "train"}
