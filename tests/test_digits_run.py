"""The default built-in task end to end: `msif precompute --task digits`, with its map."""

from __future__ import annotations

import numpy as np
import pytest

from precompute.rundir import read_manifest, read_table

pytestmark = pytest.mark.slow


def test_digits_run_is_whole(digits_run):
    manifest = read_manifest(digits_run)
    assert manifest["task"] == "digits"
    assert manifest["counts"] == {"pretrain": 901, "finetune_train": 350, "test": 546}
    assert manifest["full_scores"] is True
    assert manifest["pretraining_pass"]["path"] == "layers"
    for system in ("fixed", "updated", "pretrain"):
        assert manifest["solver"][system]["solver"] == "exact"
        assert manifest["solver"][system]["negative_eigenvalues"] == 0
    assert set(manifest["timings_s"]) >= {"load", "pretrain_solve", "pretraining_pass", "maps"}


def test_digits_map_places_every_example(digits_run):
    for name in ("pretrain", "test"):
        table = read_table(digits_run, name)
        assert np.isfinite(table[["umap_x", "umap_y"]].to_numpy()).all()
        assert table["image_png"].map(lambda b: b[:8] == b"\x89PNG\r\n\x1a\n").all()


def test_every_prediction_has_helpful_and_harmful_examples(digits_run):
    top = read_table(digits_run, "top")
    first = top[top["rank"] == 1].groupby(["scenario", "test_id", "kind"]).size()
    assert len(first) == 2 * 546 * 2
    predictions = read_table(digits_run, "predictions")
    accuracy = predictions.groupby("scenario")["correct"].mean()
    assert accuracy["updated"] > accuracy["fixed"] > 0.5
