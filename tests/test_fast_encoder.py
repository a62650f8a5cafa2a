"""The fast CPU encoder backends (ONNX Runtime, OpenVINO) against the torch encoder on the bundled sample."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from uae_ray.config import EvaluateConfig, IndexConfig, ServeConfig
from uae_ray.models import fast_encoder as fe

ROOT = Path(__file__).resolve().parent.parent


def _demo_texts() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in files("uae_ray").joinpath("assets/demo.jsonl").read_text().splitlines()]
    return [r["question"] for r in rows if "question" in r], [r["text"] for r in rows if "text" in r]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, monkeypatch_module):
    """An empty per-node cache for this module's exports."""
    path = tmp_path_factory.mktemp("uae_cache")
    monkeypatch_module.setenv("UAE_RAY_CACHE", str(path))
    fe.load_query_encoder.cache_clear()
    yield path
    fe.load_query_encoder.cache_clear()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_backend_setting_is_validated():
    assert IndexConfig(encoder_backend="onnx").encoder_backend == "onnx"
    assert EvaluateConfig(encoder_backend="openvino").encoder_backend == "openvino"
    assert ServeConfig().encoder_backend == "torch"
    with pytest.raises(ValueError, match="encoder_backend"):
        IndexConfig(encoder_backend="tensorrt")
    with pytest.raises(ValueError, match="unknown encoder backend 'tensorrt'"):
        fe.load_query_encoder("all-minilm-l6-v2", "tensorrt")


def test_publish_keeps_the_first_export_and_drops_the_losers_copy(tmp_path):
    target = tmp_path / "key"
    first, second = tmp_path / ".key.tmp-a", tmp_path / ".key.tmp-b"
    for d, tag in ((first, "a"), (second, "b")):
        d.mkdir()
        (d / fe.DONE_FILE).write_text(tag)
    assert fe._publish(first, target) is True
    assert fe._publish(second, target) is False  # another process won: its export is kept, ours removed
    assert (target / fe.DONE_FILE).read_text() == "a" and not second.exists() and not first.exists()
    broken = tmp_path / "broken"
    broken.mkdir()  # a target without its done marker (a copy made by hand) is replaced
    third = tmp_path / ".broken.tmp-c"
    third.mkdir()
    (third / fe.DONE_FILE).write_text("c")
    assert fe._publish(third, broken) is True and (broken / fe.DONE_FILE).read_text() == "c"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_parity_with_torch_on_the_bundled_sample(cache, backend):
    """cosine >= 0.999 to the torch encoder for every demo question (batch 1, as evaluate and serve encode) and
    passage (batches); the export is made once and then reused from the cache keyed by the model's content."""
    questions, passages = _demo_texts()
    torch_enc = fe.load_query_encoder("all-minilm-l6-v2", "torch")
    fast = fe.load_query_encoder("all-minilm-l6-v2", backend)
    assert fast.backend == backend and isinstance(fast, fe.OnnxEncoder) and fast.dim == torch_enc.dim == 384
    ref_q = np.concatenate([torch_enc.encode([q], batch_size=1, max_length=64) for q in questions])
    got_q = np.concatenate([fast.encode([q], batch_size=1, max_length=64) for q in questions])
    ref_p = torch_enc.encode(passages, batch_size=32)
    got_p = fast.encode(passages, batch_size=32)
    for ref, got in ((ref_q, got_q), (ref_p, got_p)):
        assert got.dtype == np.float32 and got.shape == ref.shape
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
        assert float((ref * got).sum(1).min()) >= 0.999
    assert fast.encode([]).shape == (0, 384)
    exports = [p for p in (cache / "fast_encoder").iterdir()]
    assert len(exports) == 1 and (exports[0] / fe.DONE_FILE).exists()  # one export for both backends, no temp dirs
    assert fe.export_onnx(fe.resolve("all-minilm-l6-v2").path) == exports[0]


@pytest.mark.slow
def test_concurrent_exports_in_two_processes_publish_one_valid_copy(tmp_path):
    """Two processes export the same model into one empty cache at the same time: both get the same complete
    directory, no temporary directory is left, and the file loads."""
    code = ("import sys; from pathlib import Path; from uae_ray.models.fast_encoder import export_onnx, resolve; "
            "print(export_onnx(resolve('all-minilm-l6-v2').path, Path(sys.argv[1])))")
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    dirs = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(dirs) == 1 and sorted(p.name for p in tmp_path.iterdir()) == [Path(dirs.pop()).name]
    enc = fe.OnnxEncoder(next(tmp_path.iterdir()), "onnx")
    assert enc.encode(["Where does the Thital bird live?"]).shape == (1, 384)


@pytest.mark.slow
def test_index_stage_with_the_onnx_backend_matches_torch_vectors(tmp_path, ray_session, cache):
    """`index` with encoder_backend onnx: the Ray Data actors encode through ONNX Runtime; the vectors match the
    torch encoder's, and the backend is part of the index's source (a switch rebuilds)."""
    import pyarrow as pa

    from uae_ray.data.schema import CORPUS, CORPUS_SCHEMA, INDEX
    from uae_ray.index.search import ShardedIndex
    from uae_ray.runtime import RunDir
    from uae_ray.stages import index as index_stage

    _, passages = _demo_texts()
    texts = passages[:40]
    rd = RunDir(tmp_path / "run")
    rd.write_table(CORPUS, pa.table({"pid": [f"p{i}" for i in range(len(texts))], "doc_id": ["d"] * len(texts),
                                     "title": [None] * len(texts), "text": texts,
                                     "n_tokens": [16] * len(texts)}, schema=CORPUS_SCHEMA))
    cfg = IndexConfig(encoder="all-minilm-l6-v2", num_shards=1, encoder_backend="onnx",
                      pool={"min_size": 1, "max_size": 1, "batch_size": 16})
    summary = index_stage.run(cfg, rd)
    index = ShardedIndex.load(rd.local_path(INDEX))
    assert summary["vectors"] == len(texts) and index.manifest["source"]["encoder_backend"] == "onnx"
    ref = fe.load_query_encoder("all-minilm-l6-v2", "torch").encode(texts)
    scores, pids = index.search(ref, 1)
    assert [p[0] for p in pids] == [f"p{i}" for i in range(len(texts))]  # each torch vector finds its own passage
    assert float(scores[:, 0].min()) >= 0.999  # inner product of torch and onnx vectors of the same passage
    assert not index_stage._is_current(index.manifest, cfg.model_copy(update={"encoder_backend": "torch"}),
                                       index_stage._source(cfg.model_copy(update={"encoder_backend": "torch"}),
                                                           rd.read_table(CORPUS), fe.resolve("all-minilm-l6-v2").path))


@pytest.mark.slow
def test_evaluate_dense_system_encodes_queries_through_the_backend(cache):
    """evaluate's DenseSystem with a fast query encoder ranks the sample's passages as with the torch encoder."""
    from uae_ray.eval.systems import DenseSystem

    questions, passages = _demo_texts()
    torch_enc = fe.load_query_encoder("all-minilm-l6-v2", "torch")
    vectors = torch_enc.encode(passages[:70])  # the first 10 documents (7 passages each)
    plain = DenseSystem("base", torch_enc.model, vectors)
    fast = DenseSystem("base", torch_enc.model, vectors, query_encoder=fe.load_query_encoder("all-minilm-l6-v2"))
    for q in questions[:30]:
        assert fast.rank(q, None, 3) == plain.rank(q, None, 3)
        assert float(fast.encode_query(q) @ plain.encode_query(q)) >= 0.999


@pytest.mark.gpu
def test_cuda_keeps_the_torch_encoder():
    """The GPU path is unchanged: with CUDA the torch encoder runs whatever the backend setting says."""
    enc = fe.load_query_encoder("all-minilm-l6-v2", "onnx", device="cuda")
    assert isinstance(enc, fe.TorchEncoder) and str(enc.model.device).startswith("cuda")
    assert enc.encode(["Where does the Thital bird live?"]).shape == (1, 384)
