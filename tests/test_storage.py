"""The run directory on a real S3 HTTP endpoint (moto on 127.0.0.1) and on local disk: the commit protocol (single
objects, versioned directories with a commit record, verified fetches, atomic local swaps), the single-writer lease
(conditional create, heartbeat, take-over, fencing) and writer-scoped temp clean-up. Ray Train's checkpoints and
models on S3, and their resume, are in tests/test_multinode.py (a node dies mid-run); the restore of a final
checkpoint whose model directory was lost is in tests/test_training.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from uae_ray.storage import (
    LEASE_FILE,
    SUCCESS_MARKER,
    LeaseHeldError,
    LeaseLostError,
    RunDir,
    StorageOptions,
    resolve_uri,
)

ROOT = Path(__file__).resolve().parent.parent


def _table(n: int) -> pa.Table:
    return pa.table({"qid": [f"q{i}" for i in range(n)], "x": list(range(n))})


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------------------------------------ S3 basics
def test_s3_run_dir_round_trip_and_uri_carries_the_endpoint_not_credentials(s3_run_uri, s3_endpoint):
    rd = RunDir(s3_run_uri)
    assert not rd.is_local
    assert "endpoint_override=127.0.0.1" in rd.uri and "scheme=http" in rd.uri
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in rd.uri and os.environ["AWS_ACCESS_KEY_ID"] not in rd.uri
    rd.write_table("corpus.parquet", _table(4))
    rd.write_table("utilities/part-000000.parquet", _table(2))
    rd.write_table("utilities/part-000001.parquet", _table(3))
    rd.write_json("prepare_report.json", {"kept": 4})
    assert rd.read_table("utilities").num_rows == 5 and rd.read_json("prepare_report.json") == {"kept": 4}
    # a worker on another node rebuilds the run dir from its URI alone, without AWS_ENDPOINT_URL in its env
    env = {k: v for k, v in _child_env().items() if k != "AWS_ENDPOINT_URL"}
    code = ("import sys; from uae_ray.storage import RunDir; "
            "print(RunDir(sys.argv[1]).read_table('corpus.parquet').num_rows)")
    out = subprocess.run([sys.executable, "-c", code, rd.uri], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "4", out.stderr[-2000:]


def test_storage_options_fold_into_the_uri():
    uri = resolve_uri("s3://b/run", StorageOptions(endpoint_url="http://minio.local:9000", region="eu-west-1",
                                                   path_style=False))
    assert uri.startswith("s3://b/run?") and "endpoint_override=minio.local%3A9000" in uri
    assert "scheme=http" in uri and "region=eu-west-1" in uri and "force_virtual_addressing=true" in uri
    # options already in the URI win
    assert "endpoint_override=x%3A1" in resolve_uri("s3://b/run?endpoint_override=x:1",
                                                    StorageOptions(endpoint_url="http://y:2"))


# --------------------------------------------------------------------------------------- versioned directories
def _stage(rd: RunDir, name: str, files: dict[str, bytes]) -> None:
    with rd.staged_dir(name) as d:
        for rel, data in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)


def test_s3_directory_commit_record_versions_and_verified_fetch(s3_run_uri, tmp_path):
    rd = RunDir(s3_run_uri)
    _stage(rd, "encoder", {"weights.bin": b"v1" * 1000, "sub/config.json": b"{}"})
    rec1 = rd.commit_record("encoder")
    assert set(rec1["files"]) == {"weights.bin", "sub/config.json"} and rec1["files"]["weights.bin"]["size"] == 2000
    assert rd.listdir("encoder") == [SUCCESS_MARKER, f"v-{rec1['version']}"]
    cache = tmp_path / "cache"
    local1 = rd.fetch_dir("encoder", cache_root=cache)
    assert (local1 / "weights.bin").read_bytes() == b"v1" * 1000 and (local1 / "sub" / "config.json").exists()

    # a writer that crashed mid-upload leaves an uncommitted version: readers ignore it
    rd.write_bytes("encoder/v-crashed0000000000/weights.bin", b"half")
    assert rd.fetch_dir("encoder", cache_root=tmp_path / "cache2").joinpath("weights.bin").read_bytes() == b"v1" * 1000
    # a failed save keeps the committed version
    with pytest.raises(RuntimeError, match="boom"), rd.staged_dir("encoder") as d:
        (d / "weights.bin").write_bytes(b"broken")
        raise RuntimeError("boom")
    assert rd.commit_record("encoder")["version"] == rec1["version"]

    _stage(rd, "encoder", {"weights.bin": b"v2" * 10})
    rec2 = rd.commit_record("encoder")
    assert rec2["version"] != rec1["version"]
    assert rd.listdir("encoder") == [SUCCESS_MARKER, f"v-{rec2['version']}"]  # old and crashed versions collected
    local2 = rd.fetch_dir("encoder", cache_root=cache)
    assert local2 != local1 and (local2 / "weights.bin").read_bytes() == b"v2" * 10
    assert not (local2 / "sub").exists()

    # corruption in the store (or a torn copy) is caught by the size/sha256 check, and nothing lands in the cache
    rd.write_bytes(f"encoder/v-{rec2['version']}/weights.bin", b"v3" * 10)
    with pytest.raises(ValueError, match=r"weights\.bin: size or sha256 differs"):
        rd.fetch_dir("encoder", cache_root=tmp_path / "cache3")
    assert not [p for p in (tmp_path / "cache3" / "uae_ray_fetch").iterdir() if not p.name.startswith(".")]


def test_local_directory_swap_never_shows_a_missing_or_half_directory(tmp_path):
    rd = RunDir(tmp_path / "run")
    _stage(rd, "encoder", {"a.bin": b"0", "b.bin": b"0"})
    final = rd.local_path("encoder")
    seen_missing, stop = [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads((final / SUCCESS_MARKER).read_text())
            except (FileNotFoundError, json.JSONDecodeError) as e:
                seen_missing.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(1, 30):
        _stage(rd, "encoder", {"a.bin": str(i).encode(), "b.bin": str(i).encode()})
    stop.set()
    t.join()
    assert seen_missing == []
    assert (final / "a.bin").read_bytes() == b"29" == (final / "b.bin").read_bytes()
    assert [p for p in os.listdir(tmp_path / "run") if p.startswith(".")] == []  # old versions deleted


# ----------------------------------------------------------------------------------------------------- lease
def _hold_lease_in_child(uri: str, ready: Path, seconds: float = 60) -> subprocess.Popen:
    code = ("import sys, time, pathlib; from uae_ray.storage import RunDir\n"
            "with RunDir(sys.argv[1]).lease(command='uae-ray label', heartbeat_s=0.5):\n"
            "    pathlib.Path(sys.argv[2]).write_text('held'); time.sleep(float(sys.argv[3]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, uri, str(ready), str(seconds)], env=_child_env(),
                            start_new_session=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, "the child never took the lease"
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_writer_is_refused_with_the_holder_named_and_a_dead_holder_is_replaced(where, tmp_path, request):
    uri = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_run_uri")
    rd = RunDir(uri)
    proc = _hold_lease_in_child(uri, tmp_path / "ready")
    try:
        with pytest.raises(LeaseHeldError) as e, rd.lease(take_over=True):
            pass
        msg = str(e.value)
        assert f"pid {proc.pid}" in msg and repr(socket.gethostname()) in msg and "uae-ray label" in msg
        assert "since" in msg and "heartbeat" in msg
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the holder dies without releasing (kill -9, OOM)
        proc.wait()
    assert rd.exists(LEASE_FILE)
    with rd.lease() as lease:  # its process is gone (same host): replaced at once
        assert rd._read_lease()["token"] == lease.token
        rd.write_json("x.json", {"ok": 1})
    assert not rd.exists(LEASE_FILE)  # released


@pytest.mark.parametrize("where", ["local", "s3"])
def test_stale_foreign_lease_needs_take_over_and_a_live_one_is_never_taken(where, tmp_path, request):
    uri = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_run_uri")
    rd = RunDir(uri)
    now = time.time()
    foreign = {"token": "f" * 32, "host": "node-7.cluster", "pid": 4242, "job_id": "raysubmit_abc",
               "command": "uae-ray run", "started": now - 3600, "heartbeat": now - 5}
    rd._put_lease(foreign)
    with pytest.raises(LeaseHeldError, match=r"node-7\.cluster.*pid 4242, job raysubmit_abc.*wait for it"), \
            rd.lease(take_over=True):
        pass
    rd._put_lease({**foreign, "heartbeat": now - 600})  # silent for 10 minutes
    with pytest.raises(LeaseHeldError, match="--take-over-lease"), rd.lease():
        pass
    with rd.lease(take_over=True) as lease:
        assert rd._read_lease()["token"] == lease.token


def test_a_writer_whose_lease_was_taken_over_is_fenced(s3_run_uri):
    a, b = RunDir(s3_run_uri), RunDir(s3_run_uri)
    with a.lease(heartbeat_s=0.4) as lease_a:
        a.write_json("from_a.json", {"n": 1})
        a._put_lease({**lease_a.record, "heartbeat": time.time() - 120})  # A looks dead (a partition, a pause)
        with b.lease(take_over=True, timeout_s=60):
            deadline = time.time() + 10
            while lease_a.lost is None and time.time() < deadline:
                time.sleep(0.1)
            assert lease_a.lost and "taken over" in lease_a.lost
            with pytest.raises(LeaseLostError):
                a.write_table("utilities/part-000009.parquet", _table(1))
            b.write_json("from_b.json", {"n": 2})
    assert not a.exists("utilities/part-000009.parquet") and b.read_json("from_b.json") == {"n": 2}


def test_temp_cleanup_never_touches_this_writers_temps_and_others_only_when_safe(tmp_path):
    rd = RunDir(tmp_path)
    rd.write_table("parts/part-000000.parquet", pa.table({"x": [1]}))
    d = tmp_path / "parts"
    host = socket.gethostname()[:12]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (d / f".part-000001.parquet.tmp-{host}-{dead.stdout.strip()}-0123abcd").write_bytes(b"killed writer's")
    live = ".part-000002.parquet.tmp-0a1b2c3d4e5f-99aa00bb"
    (d / live).write_bytes(b"a writer on another node, seconds ago")
    old = d / ".part-000003.parquet.tmp-ffeeddccbbaa-77aa00bb"
    old.write_bytes(b"silent for two minutes")
    os.utime(old, (time.time() - 120, time.time() - 120))
    assert rd.remove_stale_temps("parts") == 2  # no lease here: the live writer's fresh temp stays
    assert sorted(os.listdir(d)) == [live, "part-000000.parquet"]
    with rd.lease():
        mine = f".part-000004.parquet.tmp-{rd.active_lease.token[:12]}-0000aaaa"
        (d / mine).write_bytes(b"mine, in flight")
        assert rd.remove_stale_temps("parts") == 1  # under the lease nobody else may write: theirs go, mine stays
        assert sorted(os.listdir(d)) == [mine, "part-000000.parquet"]
    assert rd.read_table("parts").num_rows == 1  # readers skip dot files
