"""--resume: a run interrupted at any stage (an error, Ctrl+C, kill -9) continues from its
checkpoints and gives the same run as an uninterrupted one; other settings are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_task import TinyTask

from precompute import pipeline
from precompute.cli import main
from precompute.pipeline import PrecomputeConfig, precompute
from precompute.resume import ResumeError
from precompute.rundir import read_manifest, read_table

CONFIG = dict(solver="exact", top_k=5, full_scores="on", maps=False, device="cpu", batch_size=16)


def tables(run: Path) -> dict[str, pd.DataFrame]:
    return {name: read_table(run, name) for name in ("top", "scores", "predictions", "pretrain")}


def assert_same_run(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=False, rtol=1e-6), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    return precompute(TinyTask(), out, PrecomputeConfig(**CONFIG), log=lambda m: None)


def once(function, error=KeyboardInterrupt, when=lambda *a, **k: True):
    """`function`, raising `error` on its first call for which `when` holds."""
    state = {"raised": False}

    def wrapped(*args, **kwargs):
        if not state["raised"] and when(*args, **kwargs):
            state["raised"] = True
            raise error()
        return function(*args, **kwargs)

    return wrapped


CRASHES = {
    "describe_test": ("describe_to", lambda task, split, *a: split == "test"),
    "test_vectors_updated": ("scenario_vectors", lambda task, scenario, *a: scenario == "updated"),
    "pretrain_solve": ("pretrain_vectors", lambda *a, **k: True),
    "write": ("with_map", lambda writer, name, *a: name == "test"),
}


@pytest.mark.parametrize("stage", sorted(CRASHES))
def test_resume_after_a_crash_at_each_stage_equals_an_uninterrupted_run(
    stage, tmp_path, monkeypatch, uninterrupted
):
    name, when = CRASHES[stage]
    calls = []
    real = getattr(pipeline, name)

    def counted(*args, **kwargs):
        calls.append(args[1] if isinstance(args[1], str) else "call")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, name, once(counted, when=when))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        precompute(TinyTask(), out, PrecomputeConfig(**CONFIG), log=lambda m: None)
    assert not out.exists()
    before = len(calls)
    run = precompute(TinyTask(), out, PrecomputeConfig(**CONFIG, resume=True), log=print)
    assert read_manifest(run)["resumed"] is True
    assert_same_run(run, uninterrupted)
    if stage == "test_vectors_updated":  # the fixed vectors were not computed again
        assert calls[before:] == ["updated"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resume_mid_pass_skips_finished_shards(tmp_path, monkeypatch, uninterrupted):
    monkeypatch.setattr(pipeline, "shard_size", lambda m, batch_size: 48)  # 5 shards of m=200
    crashed = {"done": False}

    def sink_crash(function):
        def wrapped(*args, **kwargs):
            sink = args[7]

            def failing(start, scores):
                if start >= 96 and not crashed["done"]:
                    crashed["done"] = True
                    raise KeyboardInterrupt
                sink(start, scores)

            return function(*args[:7], failing, *args[8:], **kwargs)

        return wrapped

    real = pipeline.score_pretraining
    monkeypatch.setattr(pipeline, "score_pretraining", sink_crash(real))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        precompute(TinyTask(), out, PrecomputeConfig(**CONFIG), log=lambda m: None)
    (partial,) = tmp_path.iterdir()
    assert len(list((partial / "state" / "pass").glob("shard-*.pt"))) == 2
    starts = []
    monkeypatch.setattr(
        pipeline, "score_pretraining",
        lambda *a, **k: real(*a[:7], lambda s, x: (starts.append(s), a[7](s, x)), *a[8:], **k),
    )  # fmt: skip
    run = precompute(TinyTask(), out, PrecomputeConfig(**CONFIG, resume=True), log=lambda m: None)
    assert min(starts) == 96  # shards 0..47 and 48..95 were not scored again
    assert_same_run(run, uninterrupted)


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "pretrain_vectors", once(pipeline.pretrain_vectors))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        precompute(TinyTask(), out, PrecomputeConfig(**CONFIG), log=lambda m: None)
    other = {**CONFIG, "top_k": 7}
    with pytest.raises(ResumeError, match=r"other settings \(settings.top_k: 5 then, 7 now\)"):
        precompute(TinyTask(), out, PrecomputeConfig(**other, resume=True), log=lambda m: None)
    assert len(list(tmp_path.glob(".run.tmp-*/state/key.json"))) == 1  # kept to resume right
    spec = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"
    args = ["precompute", "--task", spec, "--out", str(out), "--no-maps", "--resume"]
    code = main(args + ["--solver", "cg", "--top-k", "5", "--full-scores", "on"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("msif: error: the partial run at ")
    assert "settings.solver: 'exact' then, 'cg' now" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_without_resume_a_partial_run_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "pretrain_vectors", once(pipeline.pretrain_vectors))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        precompute(TinyTask(), out, PrecomputeConfig(**CONFIG), log=lambda m: None)
    monkeypatch.undo()
    run = precompute(TinyTask(), out, PrecomputeConfig(**CONFIG), log=lambda m: None)
    assert read_manifest(run)["resumed"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.slow
def test_kill_9_during_the_pass_then_resume_gives_the_same_top_lists(tmp_path):
    spec = f"{Path(__file__).parent / 'tiny_task.py'}"
    common = ["--solver", "exact", "--batch-size", "1", "--no-maps", "--full-scores", "off"]
    whole = tmp_path / "whole"
    assert main(["precompute", "--task", f"{spec}:TinyTask", "--out", str(whole), *common]) == 0
    out = tmp_path / "run"
    command = [sys.executable, "-m", "precompute.cli", "precompute", "--task",
               f"{spec}:SlowPassTask", "--out", str(out), *common]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob(".run.tmp-*/state/pass/shard-*.pt")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not out.exists()
    resumed = main(["precompute", "--task", f"{spec}:SlowPassTask", "--out", str(out), *common,
                    "--resume"])  # fmt: skip
    assert resumed == 0
    assert read_manifest(out)["resumed"] is True
    a, b = read_table(whole, "top"), read_table(out, "top")
    pd.testing.assert_frame_equal(a, b)
    assert np.array_equal(a["pretrain_id"], b["pretrain_id"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "whole"]
