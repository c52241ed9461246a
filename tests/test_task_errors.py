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
    assert list(tmp_path.iterdir()) == []  # no temporary leftovers either


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["--damping", "-1"], "--damping: must be >= 0"),
        (["--top-k", "0"], "--top-k: must be at least 1"),
        (["--scenarios", "fixed,frozen"], "unknown scenario 'frozen'"),
    ],
)
def test_bad_arguments_get_one_sentence(args, sentence, tmp_path, capsys):
    spec = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"
    try:
        code = main(["precompute", "--task", spec, "--out", str(tmp_path / "r"), *args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert sentence in capsys.readouterr().err
