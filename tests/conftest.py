"""Shared runs: one tiny run (no map) for fast tests, one real digits run for slow ones."""

from __future__ import annotations

import os

import pytest
from tiny_task import TinyTask

from precompute.pipeline import PrecomputeConfig, precompute


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = PrecomputeConfig(
        solver="exact", damping=0.0, top_k=5, full_scores="on", maps=False, device="cpu"
    )
    return precompute(TinyTask(), out, config, log=lambda message: None)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """`msif precompute --task digits`, the default built-in task, with its UMAP map."""
    from precompute.cli import main

    root = tmp_path_factory.mktemp("digits")
    previous = os.environ.get("MSIF_CACHE")
    os.environ["MSIF_CACHE"] = str(root / "cache")
    try:
        assert main(["precompute", "--task", "digits", "--out", str(root / "run")]) == 0
    finally:
        if previous is None:
            os.environ.pop("MSIF_CACHE")
        else:
            os.environ["MSIF_CACHE"] = previous
    return root / "run"
