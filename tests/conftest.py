"""Session-wide fixtures. `../shared/` holds the official spec, manifests and golden vectors."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


def _shared_or_skip(*parts: str) -> Path:
    """A path inside ../shared; a user's clone skips these tests, CI must have them."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        reason = f"{path} not found: the golden vectors and manifests live in ../shared next to the repository"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true, so this is a failure)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _shared_or_skip("golden")


@pytest.fixture(scope="session")
def golden_e2e_dir() -> Path:
    return _shared_or_skip("golden-e2e")


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    return _shared_or_skip("manifests")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# A real S3 endpoint on loopback (moto's server), one per test session; headless Chromium for the
# gallery's browser test.
from .chromium import browser  # noqa: E402,F401
from .s3 import s3_bucket, s3_endpoint, s3_serial_endpoint  # noqa: E402,F401


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the test session, with 8 logical GPUs (stage actors fall back to the CPU)."""
    ray = pytest.importorskip("ray")
    from kvray.distributed.priority import keep_workers_at_normal_priority

    keep_workers_at_normal_priority(os.environ)
    # A temp dir of its own (short: Ray's socket paths have a limit): several sessions may run at once.
    temp_dir = tempfile.mkdtemp(prefix="kvray-test-ray-", dir="/tmp")
    ray.init(num_cpus=8, num_gpus=8, object_store_memory=300_000_000, include_dashboard=False, log_to_driver=False,
             _temp_dir=temp_dir)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
