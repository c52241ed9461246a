"""The run directory: schema, counts, top-k consistent with full scores, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from tiny_task import TinyTask

from precompute import pipeline
from precompute.outpath import OutPathError
from precompute.pipeline import PrecomputeConfig, precompute
from precompute.rundir import (
    TABLE_SCHEMAS,
    RunError,
    RunWriter,
    read_manifest,
    read_table,
    read_test_scores,
)


def test_schema_and_counts(tiny_run):
    manifest = read_manifest(tiny_run)
    task = TinyTask()
    assert manifest["counts"] == {"pretrain": task.m, "finetune_train": task.n, "test": task.q}
    assert manifest["scenarios"] == ["fixed", "updated"]
    assert manifest["full_scores"] is True and manifest["complete"] is True
    for key in (
        "schema_version",
        "task",
        "solver",
        "damping",
        "proximal_alpha",
        "top_k",
        "device",
        "timings_s",
        "versions",
        "created_at",
    ):
        assert key in manifest
    expected_rows = {
        "pretrain": task.m,
        "test": task.q,
        "predictions": 2 * task.q,
        "scores": 2 * task.q * task.m,
    }
    for name, schema in TABLE_SCHEMAS.items():
        if name == "validation":
            continue
        table = pq.read_table(tiny_run / f"{name}.parquet")
        for field in schema:
            assert table.schema.field(field.name).type == field.type, (name, field.name)
        if name in expected_rows:
            assert table.num_rows == expected_rows[name]


def test_scores_sorted_and_top_k_consistent(tiny_run):
    scores = read_table(tiny_run, "scores")
    keys = list(zip(scores["scenario"], scores["test_id"], strict=True))
    assert keys == sorted(keys)
    top = read_table(tiny_run, "top")
    for (scenario, test_id), group in top.groupby(["scenario", "test_id"]):
        full = read_test_scores(tiny_run, scenario, test_id)
        assert len(full) == TinyTask.m
        ordered = full.sort_values("score", ascending=False)
        helpful = group[group.kind == "helpful"].sort_values("rank")
        harmful = group[group.kind == "harmful"].sort_values("rank")
        positive = ordered[ordered.score > 0].head(5)
        negative = ordered[ordered.score < 0].iloc[::-1].head(5)
        assert helpful.pretrain_id.tolist() == positive.pretrain_id.tolist()
        assert harmful.pretrain_id.tolist() == negative.pretrain_id.tolist()
        assert (helpful.score > 0).all() and (harmful.score < 0).all()
        assert helpful["rank"].tolist() == list(range(1, len(helpful) + 1))


def test_predictions_agree_with_the_labels(tiny_run):
    predictions = read_table(tiny_run, "predictions")
    test = read_table(tiny_run, "test")
    merged = predictions.merge(test[["test_id", "label"]], on="test_id")
    assert (merged["correct"] == (merged["pred"] == merged["label"])).all()
    assert ((merged["confidence"] > 0) & (merged["confidence"] <= 1)).all()
    assert (merged["loss"] > 0).all()


def test_existing_complete_run_is_kept_without_overwrite(tiny_run):
    before = (tiny_run / "manifest.json").read_text()
    with pytest.raises(OutPathError, match="already holds an msif run; pass --overwrite"):
        RunWriter(tiny_run)
    assert (tiny_run / "manifest.json").read_text() == before


def test_crash_mid_run_leaves_no_complete_looking_run(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(pipeline, "score_pretraining", crash)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="power cut"):
        precompute(TinyTask(), out, PrecomputeConfig(maps=False), log=lambda message: None)
    assert not out.exists()
    # only the hidden checkpoints, for --resume
    (kept,) = tmp_path.iterdir()
    assert kept.name.startswith(".run.tmp-") and not (kept / "manifest.json").exists()


def test_crash_during_overwrite_keeps_the_old_run(tiny_run, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    monkeypatch.setattr(pipeline, "write_scores", lambda *a, **k: 1 / 0)
    config = PrecomputeConfig(maps=False, overwrite=True, full_scores="on")
    with pytest.raises(pipeline.StageError, match="stage pretraining_pass failed: ZeroDivision"):
        precompute(TinyTask(), copy, config, log=lambda message: None)
    assert read_manifest(copy)["created_at"] == read_manifest(tiny_run)["created_at"]
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".run.tmp-")]
    assert visible == ["run"]  # the old run, and the new one's checkpoints hidden beside it


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
        (lambda d: _patch(d, complete=False), "is incomplete"),
        (lambda d: _patch(d, schema_version=99), "schema_version 99"),
    ],
)
def test_reader_refuses_broken_runs(tiny_run, tmp_path, edit, message):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    edit(copy)
    with pytest.raises(RunError, match=message):
        read_manifest(copy)


def _patch(run_dir, **changes):
    path = run_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_full_scores_off_writes_no_scores_file(tmp_path):
    out = precompute(
        TinyTask(),
        tmp_path / "r",
        PrecomputeConfig(maps=False, full_scores="off"),
        log=lambda message: None,
    )
    assert not (out / "scores.parquet").exists()
    assert read_manifest(out)["full_scores"] is False
    assert read_test_scores(out, "fixed", 0) is None
    top = read_table(out, "top")
    assert set(top.kind) == {"helpful", "harmful"}


def test_scores_read_one_test_without_scanning(tiny_run):
    metadata = pq.ParquetFile(tiny_run / "scores.parquet").metadata
    assert metadata.num_row_groups >= 1
    frame = read_test_scores(tiny_run, "updated", 3)
    assert isinstance(frame, pd.DataFrame) and len(frame) == TinyTask.m
    assert np.isfinite(frame.score).all()
