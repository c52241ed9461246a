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


def test_exact_neighbours_on_the_gpu_are_those_on_the_cpu():
    from precompute.maps import nearest

    rng = np.random.default_rng(3)
    fitted = rng.normal(size=(5000, 16)).astype(np.float32)
    points = rng.normal(size=(2000, 16)).astype(np.float32)
    ids_cpu, dist_cpu = nearest(fitted, points, 5, "cpu")
    ids_gpu, dist_gpu = nearest(fitted, points, 5, "cuda")
    assert np.mean(ids_gpu == ids_cpu) > 0.999  # ties at float32 rounding may swap
    np.testing.assert_allclose(dist_gpu, dist_cpu, rtol=1e-4, atol=1e-4)


def test_pass_on_the_gpu_matches_the_cpu_at_its_own_batch_size():
    from torch import nn
    from torch.utils.data import TensorDataset

    from precompute.objective import ParamSpace
    from precompute.scoring import score_pretraining

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 4))
    data = TensorDataset(torch.randn(40_000, 20), torch.randint(0, 4, (40_000,)))
    space = ParamSpace.of(model, [n for n, _ in model.named_parameters()])
    s = torch.randn(6, space.size)

    def loss(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    cpu = score_pretraining(model, loss, data, space, s, top_k=10)
    gpu = score_pretraining(model.cuda(), loss, data, space, s.cuda(), top_k=10)
    assert torch.equal(gpu.top.helpful_ids.cpu(), cpu.top.helpful_ids)
    torch.testing.assert_close(gpu.top.harmful_scores.cpu(), cpu.top.harmful_scores)
