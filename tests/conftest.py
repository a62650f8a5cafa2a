"""Shared fixtures: one local Ray cluster per test session, paths to fixtures and to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Object-store tests talk to a moto S3 server on 127.0.0.1 only: test credentials, set before any Ray node starts so
# every raylet (and its workers) inherits them, as real nodes take theirs from their own environment.
os.environ["AWS_ACCESS_KEY_ID"] = "AKIATESTKEYID0000000"
os.environ["AWS_SECRET_ACCESS_KEY"] = "test-secret-never-in-a-uri"
os.environ["AWS_REGION"] = "us-east-1"
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)
S3_BUCKET = "uae-ray-test"

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = Path(os.environ.get("UAE_RAY_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers are off where their need is absent: gpu without CUDA, shared_data without ../shared/data."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_shared = pytest.mark.skip(reason=f"needs the shared data at {SHARED_DATA}")
    has_shared = (SHARED_DATA / "qasper").is_dir()
    has_cuda = _has_cuda()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "shared_data" in item.keywords and not has_shared:
            item.add_marker(skip_shared)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster shared by the whole test session (start-up ~3 s once)."""
    import ray

    from uae_ray.runtime import init_ray

    # Workers import test helpers only from the package; 4 logical CPUs let Data and Train overlap on 2 cores.
    init_ray(None, num_cpus=4)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's ThreadedMotoServer) with the test bucket; AWS_ENDPOINT_URL points
    at it, so `s3://` run directories (and subprocesses, and workers through the run dir's URI) reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = url
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=S3_BUCKET)
    yield url
    server.stop()
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old


@pytest.fixture
def s3_run_uri(s3_endpoint, request) -> str:
    """A fresh `s3://` run directory URI on the test endpoint (one prefix per test)."""
    import uuid

    return f"s3://{S3_BUCKET}/{request.node.name.replace('[', '-').strip(']')[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA
