"""Models calling fused scaled_dot_product_attention get the same scores as eager attention:
second-order passes run under the math backend (precompute.objective.second_order)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from attention_task import EagerAttentionTask, FusedAttentionTask

from precompute import objective
from precompute.pipeline import PrecomputeConfig, StageError, precompute
from precompute.rundir import read_table


@pytest.mark.parametrize("solver", ["exact", "cg", "ekfac"])
def test_fused_attention_scores_equal_eager_ones(tmp_path, solver):
    config = PrecomputeConfig(solver=solver, full_scores="on", maps=False, device="cpu")
    runs = {
        task.__name__: precompute(task(), tmp_path / task.__name__, config, log=lambda m: None)
        for task in (EagerAttentionTask, FusedAttentionTask)
    }
    eager, fused = (read_table(runs[k], "scores") for k in sorted(runs))
    assert set(eager["scenario"]) == {"fixed", "updated"}
    scale = np.abs(eager["score"]).max()
    assert scale > 0
    # scores are stored in float32
    np.testing.assert_allclose(fused["score"], eager["score"], rtol=0, atol=1e-6 * scale)


def test_without_the_math_backend_fused_attention_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(objective, "second_order", contextlib.nullcontext)
    config = PrecomputeConfig(solver="exact", maps=False, device="cpu")
    with pytest.raises(StageError, match="derivative for aten::_scaled_dot_product"):
        precompute(FusedAttentionTask(), tmp_path / "r", config, log=lambda m: None)
