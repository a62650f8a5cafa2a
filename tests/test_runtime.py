"""RunDir: atomic table/JSON writes, staged model directories, and a non-local pyarrow.fs URI (mock://, in memory,
which takes the object-store code path), plus the Ray start-up helper."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest

from uae_ray.runtime import SUCCESS_MARKER, RunDir, init_ray, split_blocks


def _table(n: int) -> pa.Table:
    return pa.table({"qid": [f"q{i}" for i in range(n)], "x": list(range(n))})


def _leftovers(path) -> list[str]:
    return [p for p in os.listdir(path) if ".tmp-" in p]


def test_write_table_replaces_atomically_and_failed_write_keeps_old(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write_table("t.parquet", _table(3))
    rd.write_table("t.parquet", _table(5))
    assert rd.read_table("t.parquet").num_rows == 5
    with pytest.raises(AttributeError):  # a failing write
        rd.write_table("t.parquet", {"not": "a table"})  # type: ignore[arg-type]
    assert rd.read_table("t.parquet").equals(_table(5))  # the old file is intact
    assert _leftovers(tmp_path / "run") == []
    with pytest.raises(FileNotFoundError, match=r"run the stage that writes missing\.parquet first"):
        rd.read_table("missing.parquet")


def test_directory_of_parts_reads_as_one_table_and_json(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    rd.write_table("utilities/part-0000.parquet", _table(2))
    rd.write_table("utilities/part-0001.parquet", _table(3))
    assert rd.read_table("utilities").num_rows == 5 and rd.listdir("utilities") == [
        "part-0000.parquet", "part-0001.parquet"]
    rd.write_json("sub/report.json", {"a": 1, "b": [1, 2]})
    assert rd.read_json("sub/report.json") == {"a": 1, "b": [1, 2]}
    assert _leftovers(tmp_path / "run" / "sub") == []


def test_remove_stale_temps_keeps_parts(tmp_path):
    rd = RunDir(tmp_path)
    rd.write_table("parts/part-000000.parquet", pa.table({"x": [1, 2]}))
    killed = tmp_path / "parts" / ".part-000001.parquet.tmp-0123abcd0123-0123abcd"  # a killed writer's, long ago
    killed.write_bytes(b"half a part")
    os.utime(killed, (time.time() - 3600, time.time() - 3600))
    assert rd.read_table("parts").num_rows == 2  # readers skip dot files already
    assert rd.remove_stale_temps("parts") == 1
    assert rd.listdir("parts") == ["part-000000.parquet"]
    assert rd.remove_stale_temps("parts") == 0 and rd.remove_stale_temps("missing") == 0


def test_staged_dir_success_and_failure(tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.staged_dir("encoder") as d:
        (d / "weights.bin").write_bytes(b"v1")
    assert rd.dir_complete("encoder") and (rd.local_path("encoder") / "weights.bin").read_bytes() == b"v1"
    with pytest.raises(RuntimeError, match="boom"), rd.staged_dir("encoder") as d:
        (d / "weights.bin").write_bytes(b"half")
        raise RuntimeError("boom")
    assert (rd.local_path("encoder") / "weights.bin").read_bytes() == b"v1"  # the old complete dir survives
    assert _leftovers(tmp_path / "run") == []
    with rd.staged_dir("encoder") as d:
        (d / "weights.bin").write_bytes(b"v2")
    assert (rd.fetch_dir("encoder") / "weights.bin").read_bytes() == b"v2"
    assert not rd.dir_complete("index")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        rd.fetch_dir("index")


def test_file_uri_is_local(tmp_path):
    rd = RunDir(f"file://{tmp_path}/viauri")
    assert rd.is_local
    rd.write_table("corpus.parquet", _table(4))
    assert RunDir(tmp_path / "viauri").read_table("corpus.parquet").num_rows == 4


def test_non_local_filesystem_path(tmp_path):
    """mock:// is pyarrow's in-memory filesystem: the object-store branch (PUT-style writes, uploads) for real."""
    rd = RunDir("mock:///bucket/run")
    assert not rd.is_local
    rd.write_table("queries.parquet", _table(3))
    rd.write_json("prepare_report.json", {"kept": 3})
    assert rd.read_table("queries.parquet").equals(_table(3)) and rd.read_json("prepare_report.json") == {"kept": 3}
    with pytest.raises(ValueError, match="not a local directory"):
        rd.local_path("queries.parquet")
    with rd.staged_dir("reward_model") as d:
        (d / "config.json").write_text("{}")
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"abc")
    assert rd.dir_complete("reward_model")
    version = rd.commit_record("reward_model")["version"]
    assert sorted(rd.listdir("reward_model")) == [SUCCESS_MARKER, f"v-{version}"]  # files under their version
    local = rd.fetch_dir("reward_model", cache_root=tmp_path / "cache")
    assert (local / "sub" / "w.bin").read_bytes() == b"abc" and (local / SUCCESS_MARKER).exists()
    assert rd.fetch_dir("reward_model", cache_root=tmp_path / "cache") == local  # cached: fetched once per node
    time.sleep(0.01)
    with rd.staged_dir("reward_model") as d:  # saved again (a new training run): the next fetch sees the new files
        (d / "config.json").write_text('{"v": 2}')
    again = rd.fetch_dir("reward_model", cache_root=tmp_path / "cache")
    assert again != local and (again / "config.json").read_text() == '{"v": 2}' and not (again / "sub").exists()
    assert not [p for p in (tmp_path / "cache" / "uae_ray_fetch").iterdir() if ".tmp-" in p.name]
    rd.remove("reward_model")
    assert not rd.exists("reward_model")


def test_split_blocks_contiguous_slices_cover_every_row_once():
    t = pa.table({"i": list(range(10))})
    blocks = split_blocks(t, 3)
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    assert pa.concat_tables(blocks).column("i").to_pylist() == list(range(10))
    assert [b.num_rows for b in split_blocks(t, 50)] == [1] * 10  # never more blocks than rows
    assert split_blocks(t, 0)[0].num_rows == 10
    empty = split_blocks(t.slice(0, 0), 4)
    assert len(empty) == 1 and empty[0].num_rows == 0


def test_init_ray_is_idempotent(ray_session):
    init_ray(None)  # already up: a no-op, no second cluster
    assert ray_session.is_initialized()
    assert ray_session.cluster_resources().get("CPU") == 4
