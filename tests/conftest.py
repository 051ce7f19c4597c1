"""Shared test fixtures and marker handling.

``gpu`` tests are skipped with their reason when no CUDA device is present, so the default
``make test`` reports them as skipped rather than silently dropping them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (see recon3d/__init__.py)

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: keep every test process to a fixed, small thread count so runs are comparable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (and the CUDA backend library); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
