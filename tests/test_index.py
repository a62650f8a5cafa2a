"""Sharded FAISS index: build, exact merge against one unsharded Flat, mmap reload, bad input, and the index stage."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uae_ray.config import ConfigError, IndexConfig, build_config
from uae_ray.data.schema import CORPUS, CORPUS_SCHEMA, INDEX, INDEX_IDS_SCHEMA
from uae_ray.index.build import IndexBuildError, build_sharded_index, shard_file
from uae_ray.index.search import ShardedIndex, check_queries, load_shard, merge_topk
from uae_ray.index.versions import CURRENT, IndexVersionError, current_version, list_versions, publish
from uae_ray.runtime import RunDir


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(7)
    x = _unit(rng, 3001, 32)
    # exact duplicates spread over different shards -> tied scores the merge must order like IndexFlatIP
    for src, dsts in ((5, (1200, 2999)), (1500, (7, 2600)), (2400, (30, 2001))):
        for d in dsts:
            x[d] = x[src]
    queries = np.concatenate([x[[5, 1500, 2400]], _unit(rng, 61, 32)])
    return x, [f"doc{i // 7}#{i % 7}" for i in range(len(x))], queries


@pytest.mark.parametrize("num_shards", [1, 3, 4])
def test_sharded_flat_search_equals_unsharded_flat_exactly(tmp_path, data, num_shards):
    x, pids, queries = data
    build_sharded_index(x, pids, "Flat", num_shards, tmp_path)
    index = ShardedIndex.load(tmp_path)
    ref = faiss.IndexFlatIP(x.shape[1])
    ref.add(x)
    for k in (1, 2, 3, 10, 57):
        ref_d, ref_i = ref.search(queries, k)
        d, i = index.search_ids(queries, k)
        np.testing.assert_array_equal(i, ref_i)  # same ids in the same order, exact ties included
        np.testing.assert_array_equal(d, ref_d)  # bit-identical scores
        scores, got_pids = index.search(queries, k)
        assert got_pids == [[pids[j] for j in row] for row in ref_i]
        np.testing.assert_array_equal(scores, ref_d)
    # the duplicated vectors really tie (score 1.0 three times), spread over shards
    d, i = index.search_ids(queries[:3], 3)
    assert i.tolist() == [[2999, 1200, 5], [2600, 1500, 7], [2400, 2001, 30]]
    assert d == pytest.approx(np.ones((3, 3)), abs=1e-6)


def test_merge_topk_keeps_max_and_pads_missing():
    d1 = np.array([[0.9, 0.1, -1.0]], dtype=np.float32)
    i1 = np.array([[4, 2, -1]], dtype=np.int64)  # -1: a shard with fewer hits than k
    d2 = np.array([[0.5, 0.9]], dtype=np.float32)
    i2 = np.array([[8, 6]], dtype=np.int64)
    d, i = merge_topk([d1, d2], [i1, i2], 6)
    assert i.tolist() == [[6, 4, 8, 2, -1, -1]]
    assert d[0, :4].tolist() == pytest.approx([0.9, 0.9, 0.5, 0.1])
    assert np.isneginf(d[0, 4:]).all()


def test_build_writes_manifest_ids_and_mmap_reload(tmp_path, data):
    x, pids, queries = data
    manifest = build_sharded_index(x, pids, "Flat", 3, tmp_path, encoder="all-minilm-l6-v2")
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["encoder"] == "all-minilm-l6-v2"
    assert (manifest["dim"], manifest["num_shards"], manifest["vectors"]) == (32, 3, len(x))
    assert sum(manifest["shard_sizes"]) == len(x) and manifest["mmap_flag"] == "IO_FLAG_MMAP_IFC"
    ids = pq.read_table(tmp_path / "ids.parquet")
    assert ids.schema.equals(INDEX_IDS_SCHEMA)
    assert ids.column("id").to_pylist() == list(range(len(x)))
    assert ids.column("pid").to_pylist() == pids
    assert sorted(set(ids.column("shard").to_pylist())) == [0, 1, 2]
    for s in range(3):
        plain = load_shard(tmp_path, s, mmap=False)
        mapped = load_shard(tmp_path, s, mmap=True)
        assert plain.ntotal == mapped.ntotal == manifest["shard_sizes"][s]
        np.testing.assert_array_equal(plain.search(queries, 5)[1], mapped.search(queries, 5)[1])
    assert not list(tmp_path.glob("*.pkl"))


def test_ivf_quantizer_trained_once_and_full_probe_is_exact(tmp_path, data):
    x, pids, queries = data
    manifest = build_sharded_index(x, pids, "IVF16,Flat", 3, tmp_path, search_params={"nprobe": 16})
    assert manifest["mmap_flag"] == "IO_FLAG_MMAP" and manifest["search_params"] == {"nprobe": 16}
    shards = [load_shard(tmp_path, s, mmap=False) for s in range(3)]  # kept alive: the quantizers belong to them
    centroids = [faiss.downcast_index(faiss.extract_index_ivf(s).quantizer).reconstruct_n(0, 16) for s in shards]
    for c in centroids[1:]:
        np.testing.assert_array_equal(c, centroids[0])  # one training, cloned into every shard
    ref = faiss.IndexFlatIP(x.shape[1])
    ref.add(x)
    _, ref_i = ref.search(queries, 10)
    _, i = ShardedIndex.load(tmp_path).search_ids(queries, 10)
    np.testing.assert_array_equal(i, ref_i)  # nprobe = nlist visits every list: exhaustive


@pytest.mark.parametrize("factory", ["HNSW16", "IVF16,PQ8x4"])
def test_approximate_factories_build_and_recall(tmp_path, data, factory):
    x, pids, queries = data
    build_sharded_index(x, pids, factory, 2, tmp_path)
    index = ShardedIndex.load(tmp_path)
    ref = faiss.IndexFlatIP(x.shape[1])
    ref.add(x)
    _, ref_i = ref.search(queries, 10)
    _, i = index.search_ids(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i.tolist(), ref_i.tolist(), strict=True)])
    assert recall >= (0.9 if factory.startswith("HNSW") else 0.2), recall  # chance: 10 / 3001


def test_bad_inputs_name_the_problem(tmp_path, data):
    x, pids, _ = data
    with pytest.raises(IndexBuildError, match="not unit length"):
        build_sharded_index(x * 2, pids, "Flat", 2, tmp_path)
    with pytest.raises(IndexBuildError, match="not unique"):
        build_sharded_index(x[:3], ["a", "a", "b"], "Flat", 1, tmp_path)
    with pytest.raises(IndexBuildError, match="multiple"):
        build_sharded_index(x, pids, "IVF8,PQ5", 2, tmp_path)
    with pytest.raises(IndexBuildError, match="lists need at least"):
        build_sharded_index(x[:10], pids[:10], "IVF16,Flat", 1, tmp_path)
    with pytest.raises(IndexBuildError, match="num_shards"):
        build_sharded_index(x[:3], pids[:3], "Flat", 4, tmp_path)
    with pytest.raises(IndexBuildError, match="unsupported factory"):
        build_sharded_index(x, pids, "LSH", 2, tmp_path)
    with pytest.raises(ValueError, match=r"shape \[n, 32\]"):
        check_queries(np.zeros((2, 31), np.float32), 32)
    with pytest.raises(ConfigError, match="factory"):
        build_config(IndexConfig, {"factory": "IVF,Flat"}, source="test.yaml")


def test_load_missing_index_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"manifest\.json"):
        ShardedIndex.load(tmp_path)


@pytest.mark.gpu
def test_build_on_gpu_matches_cpu(tmp_path, data):
    x, pids, queries = data
    cpu = tmp_path / "cpu"
    gpu = tmp_path / "gpu"
    cpu.mkdir()
    gpu.mkdir()
    build_sharded_index(x, pids, "Flat", 2, cpu, use_gpu=False)
    manifest = build_sharded_index(x, pids, "Flat", 2, gpu, use_gpu=True)
    assert manifest["built_on"] == "gpu"
    np.testing.assert_array_equal(
        ShardedIndex.load(cpu).search_ids(queries, 10)[1], ShardedIndex.load(gpu).search_ids(queries, 10)[1]
    )


def _tiny_corpus() -> pa.Table:
    texts = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "The Pacific Ocean is the largest and deepest ocean on Earth.",
        "Mount Everest is the highest mountain above sea level.",
        "Python is a programming language that emphasises readability.",
        "The mitochondrion is the powerhouse of the cell.",
    ] * 3
    n = len(texts)
    return pa.table(
        {
            "pid": [f"d{i // 6}#{i % 6}" for i in range(n)],
            "doc_id": [f"d{i // 6}" for i in range(n)],
            "title": [None] * n,
            "text": [f"{t} (copy {i // 6})" for i, t in enumerate(texts)],
            "n_tokens": [16] * n,
        },
        schema=CORPUS_SCHEMA,
    )


def test_index_stage_encodes_builds_and_skips_when_current(tmp_path, ray_session):
    from uae_ray.models.encoder import encode, load_encoder
    from uae_ray.stages import index as index_stage

    rd = RunDir(tmp_path / "run")
    rd.write_table(CORPUS, _tiny_corpus())
    cfg = IndexConfig(encoder="all-minilm-l6-v2", num_shards=2, pool={"min_size": 1, "max_size": 1, "batch_size": 4})
    summary = index_stage.run(cfg, rd)
    assert summary["skipped"] is False and summary["vectors"] == 18 and summary["dim"] == 384
    version = summary["version"]
    assert current_version(rd, INDEX) == version and list_versions(rd, INDEX) == [version]
    index = ShardedIndex.load(rd.local_path(INDEX))  # follows index/CURRENT
    assert index.version == version and index.index_dir == rd.local_path(INDEX) / version
    assert index.manifest["encoder"] == "all-minilm-l6-v2" and index.manifest["source"]["corpus_rows"] == 18
    q = encode(load_encoder("all-minilm-l6-v2"), ["What is the tallest mountain?"])
    _, pids = index.search(q, 3)
    assert {p.split("#")[1] for p in pids[0]} == {"3"}  # the three copies of the Everest passage
    assert sorted(p.split("#")[0] for p in pids[0]) == ["d0", "d1", "d2"]
    assert (rd.local_path(INDEX) / version / shard_file(1)).exists()
    passages = pq.read_table(rd.local_path(INDEX) / version / "passages.parquet")  # the version's own texts
    assert passages.num_rows == 18 and "Everest" in passages.column("text")[3].as_py()
    again = index_stage.run(cfg, rd)
    assert again["skipped"] is True and again["version"] == version
    source = index.manifest["source"]
    manifest = index.manifest
    assert index_stage._is_current(manifest, cfg, source)
    assert not index_stage._is_current(manifest, cfg.model_copy(update={"num_shards": 3}), source)
    assert not index_stage._is_current(manifest, cfg.model_copy(update={"factory": "HNSW8"}), source)
    assert not index_stage._is_current(manifest, cfg, {**source, "corpus_sha1": "changed"})
    # a run-dir encoder ("run:encoder", what train-encoder writes): the actors resolve it on their own node
    import shutil

    from uae_ray.calibration import fit_calibration, load_calibration, save_calibration
    from uae_ray.models.registry import resolve

    assert not (rd.local_path(INDEX) / version / "calibration.json").exists()  # a registry encoder has none
    assert summary["calibration"] is None
    with rd.staged_dir("encoder") as d:
        shutil.copytree(resolve("all-minilm-l6-v2").path, d, dirs_exist_ok=True)
        save_calibration(fit_calibration(np.linspace(0, 1, 50), np.linspace(-1, 2, 50) ** 3), d / "calibration.json")
    own = index_stage.run(cfg.model_copy(update={"encoder": "run:encoder"}), rd)
    assert own["skipped"] is False and own["vectors"] == 18 and own["version"] > version
    # the student's calibration travels with the index version it scores (committed in it, named in its manifest)
    carried = rd.local_path(INDEX) / own["version"] / "calibration.json"
    assert carried.read_bytes() == (rd.local_path("encoder") / "calibration.json").read_bytes()
    assert "calibration.json" in json.loads((carried.parent / "_SUCCESS").read_text())["files"]
    assert own["calibration"] == "calibration.json" and load_calibration(carried).n_pairs == 50
    assert list_versions(rd, INDEX) == [version, own["version"]]  # the old version stays, untouched
    _, pids2 = ShardedIndex.load(rd.local_path(INDEX)).search(q, 3)
    assert sorted(pids2[0]) == sorted(pids[0])
    assert ShardedIndex.load(rd.local_path(INDEX)).version == own["version"]


def _publish(rd: RunDir, x: np.ndarray, pids: list[str], tag: str, keep: int = 3) -> str:
    def build(out, version):
        passages = pa.table({"doc_id": [tag] * len(pids), "text": [f"{tag} {p}" for p in pids]})
        return build_sharded_index(x, pids, "Flat", 2, out, extra={"version": version}, passages=passages)

    return publish(rd, INDEX, {"tag": tag}, build, keep_versions=keep)[0]


def test_index_versions_are_immutable_and_the_pointer_moves(tmp_path, data):
    """A rebuild writes a new version beside the old one and only moves index/CURRENT: a reader that pinned the
    old version still reads the old ids, pids and texts (today's in-place rebuild replaced them under it)."""
    x, pids, queries = data
    rd = RunDir(tmp_path / "run")
    v1 = _publish(rd, x[:1000], pids[:1000], "one")
    old = ShardedIndex.load(rd.local_path(INDEX) / v1)
    before = old.search(queries, 5)
    v2 = _publish(rd, x[1000:2000], [f"other{i}" for i in range(1000)], "two")
    assert v2 > v1 and json.loads((rd.local_path(INDEX) / CURRENT).read_text())["version"] == v2
    assert ShardedIndex.load(rd.local_path(INDEX)).version == v2  # "the index" follows the pointer
    again = ShardedIndex.load(rd.local_path(INDEX) / v1)  # the pinned version is unchanged on disk
    np.testing.assert_array_equal(again.search(queries, 5)[0], before[0])
    assert again.search(queries, 5)[1] == before[1] and again.version == v1
    p1 = pq.read_table(rd.local_path(INDEX) / v1 / "passages.parquet").column("text").to_pylist()
    assert p1[0] == f"one {pids[0]}"


def test_old_versions_are_pruned_but_never_the_current_one(tmp_path, data):
    x, pids, _ = data
    rd = RunDir(tmp_path / "run")
    made = [_publish(rd, x[:50], pids[:50], f"t{i}", keep=2) for i in range(4)]
    assert list_versions(rd, INDEX) == made[-2:] and current_version(rd, INDEX) == made[-1]
    # point back at an old version (a rollback), then publish with keep=1: the pointed-to version survives
    rd.write_json(f"{INDEX}/{CURRENT}", {"version": made[2]})
    assert ShardedIndex.load(rd.local_path(INDEX)).version == made[2]
    from uae_ray.index.versions import prune

    assert prune(rd, INDEX, 1) == []  # keeps the newest one and the current one, which is not the newest
    assert list_versions(rd, INDEX) == made[2:]
    newest = _publish(rd, x[:50], pids[:50], "t5", keep=1)
    assert list_versions(rd, INDEX) == [newest]


def test_missing_or_bad_pointer_is_a_clear_error(tmp_path, data):
    x, pids, _ = data
    rd = RunDir(tmp_path / "run")
    with pytest.raises(IndexVersionError, match="CURRENT: not found"):
        current_version(rd, INDEX)
    v = _publish(rd, x[:50], pids[:50], "a")
    rd.write_json(f"{INDEX}/{CURRENT}", {"version": "20990101T000000000000Z-0123456789"})
    with pytest.raises(IndexVersionError, match="missing or incomplete index version"):
        current_version(rd, INDEX)
    with pytest.raises(IndexVersionError, match="missing or incomplete"):
        ShardedIndex.load(rd.local_path(INDEX))
    rd.write_text(f"{INDEX}/{CURRENT}", "{not json")
    with pytest.raises(IndexVersionError, match="not valid JSON"):
        current_version(rd, INDEX)
    assert ShardedIndex.load(rd.local_path(INDEX) / v).version == v


def test_index_versions_on_an_object_store(s3_run_uri, data):
    """On S3 (moto): versions, the pointer, fetch of one version, pruning, and ShardedIndex over a fetched version."""
    from uae_ray.index.versions import fetch_index, has_index, prune

    x, pids, queries = data
    rd = RunDir(s3_run_uri)
    assert not has_index(rd, INDEX)
    v1 = _publish(rd, x[:500], pids[:500], "one")
    v2 = _publish(rd, x[500:1000], pids[500:1000], "two")
    assert has_index(rd, INDEX) and current_version(rd, INDEX) == v2 and list_versions(rd, INDEX) == [v1, v2]
    version, local = fetch_index(rd, INDEX, v1)  # a pinned older version, fetched whole and verified
    assert version == v1 and ShardedIndex.load(local).version == v1
    assert ShardedIndex.load(local).search(queries[:2], 3)[1][0][0] in pids[:500]
    v3 = _publish(rd, x[:50], pids[:50], "three", keep=2)
    assert list_versions(rd, INDEX) == [v2, v3] and prune(rd, INDEX, 2) == []
