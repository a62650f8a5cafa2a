"""Shared fixtures: one local Ray cluster per test session, paths to fixtures and to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

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


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA
