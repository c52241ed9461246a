"""On a CUDA machine, the engine's run matches the CPU run (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_task import TinyTask

from precompute.pipeline import PrecomputeConfig, precompute
from precompute.rundir import read_manifest, read_table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("solver", ["exact", "cg", "ekfac"])
def test_cuda_run_matches_cpu_run(tmp_path, solver):
    runs = {}
    for device in ("cpu", "cuda"):
        config = PrecomputeConfig(
            solver=solver, damping=0.0, device=device, full_scores="on", maps=False, cg_tol=1e-10
        )
        runs[device] = precompute(TinyTask(), tmp_path / device, config, log=lambda m: None)
    assert "cuda" not in read_manifest(runs["cpu"])["device"]
    assert read_manifest(runs["cuda"])["device"] == torch.cuda.get_device_name()
    cpu, gpu = (read_table(runs[d], "scores")["score"].to_numpy() for d in ("cpu", "cuda"))
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-6 * np.abs(cpu).max())
