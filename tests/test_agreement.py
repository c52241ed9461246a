"""Solver agreement: exact against well-converged cg is perfect; overlap counts both ends."""

from __future__ import annotations

import numpy as np
from tiny_task import TinyTask

from precompute.agreement import top_overlap
from precompute.pipeline import PrecomputeConfig, precompute
from precompute.rundir import read_manifest


def test_top_overlap_counts_helpful_and_harmful_ends():
    a = np.arange(30.0)[None, :]
    assert top_overlap(a, a) == 1.0
    b = a.copy()
    b[0, 29], b[0, 0] = -100.0, 100.0  # the largest and smallest swap ends
    assert top_overlap(a, b) == 0.9


def test_exact_agrees_with_cg_and_the_manifest_records_it(tmp_path):
    config = PrecomputeConfig(solver="exact", damping=0.0, maps=False, agreement_tests=3)
    run = precompute(TinyTask(), tmp_path / "r", config, log=lambda message: None)
    agreement = read_manifest(run)["solver_agreement"]
    assert agreement["tests"] == 3
    assert agreement["spearman"] > 0.99999
    assert agreement["top10_overlap"] == 1.0
