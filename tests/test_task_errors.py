"""Every malformed task gets one clear sentence from the command line, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from precompute.cli import main

BAD = Path(__file__).parent / "bad_tasks.py"


@pytest.mark.parametrize(
    ("spec", "sentence"),
    [
        (f"{BAD}:NoDescribe", "does not implement describe"),
        (
            f"{BAD}:MissingShared",
            "shared parameter 'encoder.7.weight' is not a parameter of the pretrained model",
        ),
        (f"{BAD}:MeanLoss", "pretrain_loss() on a batch of 2 from pretrain_data returned shape []"),
        (f"{BAD}:NanLoss", "finetune_loss() returned non-finite values"),
        (f"{BAD}:EmptyPretrain", "pretrain_data() is empty"),
        (
            f"{BAD}:RaisingModel",
            "finetuned_model() raised FileNotFoundError: checkpoint ft.pt is missing",
        ),
        (f"{BAD}:MovedFixedEncoder", "must equal the pretrained one"),
        (f"{BAD}:NotATask", "is not a subclass of precompute.MultiStageTask"),
        (f"{BAD}:ItemInLoss", "stage pretraining_pass failed: RuntimeError: vmap"),
        (f"{BAD}:Absent", "task class 'Absent' not found"),
        ("no/such/file.py:Task", "task file 'no/such/file.py' does not exist"),
        ("nosuchpackage.module:Task", "cannot import task module 'nosuchpackage.module'"),
        ("imagenet", "unknown task 'imagenet'"),
    ],
)
def test_malformed_task_gets_one_sentence(spec, sentence, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["precompute", "--task", spec, "--out", str(out), "--no-maps"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("msif: error: ")
    assert sentence in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()
    # no leftovers, but for the checkpoints of stages that finished (hidden, for --resume)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".run.tmp-")] == []
    for kept in tmp_path.iterdir():
        assert (kept / "state" / "key.json").is_file() and len(list(kept.glob("state/*.json"))) > 1


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["--damping", "-1"], "--damping must be a finite number >= 0, or auto, got -1.0"),
        (["--damping", "inf"], "--damping must be a finite number >= 0, or auto, got inf"),
        (["--damping", "1e999"], "--damping must be a finite number >= 0"),
        (["--damping", "nan"], "--damping must be a finite number >= 0"),
        (["--cg-tol", "nan"], "--cg-tol must be a number in (0, 1), got nan"),
        (["--cg-tol", "-1"], "--cg-tol must be a number in (0, 1), got -1.0"),
        (["--cg-tol", "0"], "--cg-tol must be a number in (0, 1)"),
        (["--cg-tol", "1"], "--cg-tol must be a number in (0, 1)"),
        (["--cg-tol", "inf"], "--cg-tol must be a number in (0, 1)"),
        (["--agreement-tests", "-1"], "--agreement-tests must be a whole number in 0.."),
        (["--top-k", "0"], "--top-k must be a whole number in 1.."),
        (["--top-k", str(2**40)], "--top-k must be a whole number in 1.."),
        (["--batch-size", "0"], "--batch-size must be a whole number in 1.."),
        (["--cg-max-iter", "-5"], "--cg-max-iter must be a whole number in 1.."),
        (["--scenarios", "fixed,frozen"], "--scenarios 'frozen' is unknown"),
        (["--scenarios", ""], "--scenarios '' is unknown"),
        (["--scenarios", "fixed,,updated"], "--scenarios '' is unknown"),
        (["--scenarios", "fixed,fixed"], "--scenarios names fixed more than once"),
    ],
)
def test_bad_numbers_get_one_sentence_before_any_work(args, sentence, tmp_path, capsys):
    spec = f"{BAD}:RaisingModel"  # loading this task fails: the settings are checked first
    code = main(["precompute", "--task", spec, "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("msif: error: ") and sentence in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["precompute", "--task", "t", "--out", "r", "--top-k", "many"], "must be a whole number"),
        (["precompute", "--task", "t", "--out", "r", "--damping", "lots"], "must be a number"),
        (["explore", "r", "--port", "99999"], "--port: must be in 1..65535, got '99999'"),
        (["explore", "r", "--port", "0"], "--port: must be in 1..65535"),
        (["validate", "--task", "t", "--run", "r", "--seed", "-1"], "--seed: must be in 0.."),
        (["validate", "--task", "t", "--run", "r", "--n", "0"], "--n: must be in 1.."),
    ],
)
def test_unparsable_arguments_get_one_sentence(args, sentence, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert sentence in err and "Traceback" not in err
