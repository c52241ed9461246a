"""A run is never finished on numbers that mean nothing: unconverged solves are errors unless
allowed (and then recorded per test), non-finite or all-zero vectors and scores are errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_task import BrieflyTrainedTask, TinyTask

from precompute import pipeline
from precompute.cli import main
from precompute.health import SolveError
from precompute.pipeline import PrecomputeConfig, precompute

TASKS = Path(__file__).parent / "tiny_task.py"


def cli(task, out, *extra, capsys):
    code = main(["precompute", "--task", f"{TASKS}:{task}", "--out", str(out), "--no-maps", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return code, err


def test_negative_curvature_is_an_error_naming_the_hessian(tmp_path, capsys, monkeypatch):
    passes = []
    monkeypatch.setattr(pipeline, "score_pretraining", lambda *a, **k: passes.append(1))
    code, err = cli("BrieflyTrainedTask", tmp_path / "r", "--solver", "cg", "--damping", "0",
                    capsys=capsys)  # fmt: skip
    assert code == 2
    message = err[-1]
    for phrase in (
        "stage pretrain_solve",
        "pretraining Hessian H_G solve (cg)",
        "for 12 of 12 test vectors (fixed 6, updated 6)",
        "negative curvature (down to -",
        "add damping (--damping more than",
        "--solver ekfac",
        "--allow-unconverged",
    ):
        assert phrase in message, message
    assert passes == []  # it stopped before the pretraining pass
    assert list(tmp_path.iterdir()) == []


def test_allow_unconverged_writes_the_run_and_records_the_tests(tmp_path):
    config = PrecomputeConfig(
        solver="cg", damping=0.0, maps=False, device="cpu", allow_unconverged=True
    )
    messages = []
    run = precompute(BrieflyTrainedTask(), tmp_path / "r", config, log=messages.append)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["allow_unconverged"] is True
    q = BrieflyTrainedTask.q
    assert manifest["unconverged_tests"] == {"fixed": list(range(q)), "updated": list(range(q))}
    assert manifest["solver"]["pretrain"]["negative_curvature_rows"] == 2 * q
    assert manifest["solver"]["pretrain"]["min_curvature"] < 0
    assert "unconverged_rows" not in manifest["solver"]["pretrain"]
    assert any("warning: stage pretrain_solve" in m for m in messages)


def test_too_few_iterations_is_an_error_naming_the_scenario(tmp_path, capsys):
    code, err = cli("TinyTask", tmp_path / "r", "--solver", "cg", "--cg-max-iter", "1",
                    "--scenarios", "updated", capsys=capsys)  # fmt: skip
    assert code == 2
    assert "stage test_vectors_updated: the finetuning Hessian K of the updated scenario" in err[-1]
    assert "within 1 iterations" in err[-1] and "raise --cg-max-iter" in err[-1]
    assert list(tmp_path.iterdir()) == []


def test_converged_run_records_no_unconverged_tests(tiny_run):
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["unconverged_tests"] == {} and manifest["allow_unconverged"] is False


def test_scores_all_zero_in_float32_are_an_error(tmp_path, capsys):
    # damping so large that every s-vector is ~1e-300: the scores round to 0 in float32
    code, err = cli("TinyTask", tmp_path / "r", "--solver", "exact", "--damping", "1e300",
                    capsys=capsys)  # fmt: skip
    assert code == 2
    assert "stage pretraining_pass: every score is zero in float32" in err[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("value", "phrase"), [(float("nan"), "not finite"), (0.0, "all zero")])
def test_broken_s_vectors_are_an_error_naming_the_stage(tmp_path, monkeypatch, value, phrase):
    real = pipeline.pretrain_vectors

    def broken(*args, **kwargs):
        s, info = real(*args, **kwargs)
        s = s.clone()
        s[1 if value != 0 else slice(None)] = value
        return s, info

    monkeypatch.setattr(pipeline, "pretrain_vectors", broken)
    config = PrecomputeConfig(solver="exact", maps=False, device="cpu")
    with pytest.raises(SolveError, match=f"stage pretrain_solve: the s-vectors are {phrase}"):
        precompute(TinyTask(), tmp_path / "r", config, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_test_vectors_name_the_first_test(tmp_path, monkeypatch):
    real = pipeline.scenario_vectors

    def broken(*args, **kwargs):
        u, info = real(*args, **kwargs)
        u = u.clone()
        u[4, 0] = torch.inf
        return u, info

    monkeypatch.setattr(pipeline, "scenario_vectors", broken)
    config = PrecomputeConfig(solver="exact", maps=False, device="cpu")
    with pytest.raises(SolveError, match=r"test_vectors_fixed: .* for 1 of 6 tests \(first: fixed"):
        precompute(TinyTask(), tmp_path / "r", config, log=lambda m: None)
