"""Shared fixtures. ``data_root`` points at the real data sets (``SPARSECL_DATA`` or
``<repo>/../shared/data``); a missing data root fails the tests that need it instead of skipping
them, so a CI job without the data cannot pass silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The test models are tiny: one thread is faster than two, and a second thread fighting another
# process for the same cores slows small operations down many times over.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("SPARSECL_DATA", REPO_ROOT.parent / "shared" / "data"))
    raw = root / "MNIST" / "raw"
    missing = [n for n in MNIST_FILES if not (raw / f"{n}.gz").is_file() and not (raw / n).is_file()]
    if missing:
        pytest.fail(
            f"data root {root} has no MNIST files (missing {', '.join(missing)} in {raw}, with or "
            f"without .gz); set SPARSECL_DATA to a directory holding MNIST/raw/ and FashionMNIST/raw/",
            pytrace=False,
        )
    return root


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder: a ``sparsecl run`` without ``--out`` writes
    its default run folder (``runs/...``) there, never into the checkout."""
    monkeypatch.chdir(tmp_path)
