"""Ids out of range in a run: `check_ids` when a run is opened, the one-test score read, and
`msif validate`, each one sentence naming the table, the column and the id."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explorer.synthetic import write_synthetic_run
from precompute import rundir
from precompute.cli import main
from precompute.rundir import RunError, check_ids, read_test_scores_checked, unconverged_tests

TINY_TASK = f"{Path(__file__).resolve().parent / 'tiny_task.py'}:TinyTask"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """60 pretraining examples (ids 0..59), 6 tests (0..5), full scores in 12 row groups."""
    out = tmp_path_factory.mktemp("ids") / "good"
    return write_synthetic_run(out, 60, 6, top_k=5, seed=3)


def copy_run(run: Path, out: Path) -> Path:
    shutil.copytree(run, out)
    return out


def rewrite(run: Path, name: str, edit, **write_kwargs) -> None:
    """Replace `name`.parquet by `edit(frame)` (returning a frame or an arrow table)."""
    path = run / f"{name}.parquet"
    table = edit(pq.read_table(path).to_pandas())
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    pq.write_table(table, path, **write_kwargs)


def set_first(column: str, value):
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame.loc[0, column] = value
        return frame

    return edit


def error_of(run: Path, **kwargs) -> str:
    with pytest.raises(RunError) as caught:
        check_ids(run, **kwargs)
    return str(caught.value)


def test_a_whole_run_passes_and_returns_its_ids(good_run):
    pretrain, test = check_ids(good_run, manifest=rundir.read_manifest(good_run))
    assert list(pretrain) == list(range(60)) and list(test) == list(range(6))


@pytest.mark.parametrize(
    ("table", "column", "value", "owner"),
    [
        ("top", "pretrain_id", 999999, "pretrain"),
        ("top", "test_id", 999, "test"),
        ("top", "pretrain_id", -1, "pretrain"),
        ("predictions", "test_id", 6, "test"),
        ("validation", "pretrain_id", 60, "pretrain"),
        ("validation", "test_id", 123456, "test"),
    ],
)
def test_an_id_the_run_does_not_hold_is_one_sentence(
    good_run, tmp_path, table, column, value, owner
):
    run = copy_run(good_run, tmp_path / "run")
    rewrite(run, table, set_first(column, value))
    assert error_of(run) == (
        f"{table}.parquet names {column} {value}, which {owner}.parquet does not hold"
    )


def test_a_null_id_is_named(good_run, tmp_path):
    run = copy_run(good_run, tmp_path / "run")

    def null_first(frame):
        ids = frame["pretrain_id"].astype("Int64")
        ids.iloc[0] = pd.NA
        return frame.assign(pretrain_id=ids)

    rewrite(run, "top", null_first)
    assert error_of(run) == "top.parquet has a null pretrain_id (row 0)"


def test_a_fractional_id_is_named(good_run, tmp_path):
    run = copy_run(good_run, tmp_path / "run")
    rewrite(run, "top", lambda f: f.assign(pretrain_id=f["pretrain_id"].astype(float) + 0.5))
    assert error_of(run).startswith("top.parquet holds pretrain_id ")
    assert error_of(run).endswith(".5, which is not a whole number")


def test_ids_written_as_text_are_named(good_run, tmp_path):
    run = copy_run(good_run, tmp_path / "run")
    rewrite(run, "top", lambda f: f.assign(pretrain_id=f["pretrain_id"].astype(str)))
    first = pq.read_table(good_run / "top.parquet").column("pretrain_id")[0].as_py()
    assert error_of(run) == f"top.parquet holds pretrain_id '{first}', which is not a whole number"


@pytest.mark.parametrize("name", ["pretrain", "test"])
def test_repeated_ids_of_the_examples_are_named(good_run, tmp_path, name):
    run = copy_run(good_run, tmp_path / "run")
    rewrite(run, name, lambda f: pd.concat([f, f.iloc[[2]]], ignore_index=True))
    assert error_of(run) == f"{name}.parquet holds {name}_id 2 more than once"


def scores_with(good_run: Path, run: Path, column: str, value: int) -> None:
    """scores.parquet with one row's `column` set to `value`, in several row groups."""
    rewrite(run, "scores", set_first(column, value), row_group_size=60)
    assert pq.ParquetFile(run / "scores.parquet").metadata.num_row_groups > 1


@pytest.mark.parametrize(
    ("column", "value", "owner"),
    [
        ("pretrain_id", 999999, "pretrain"),
        ("test_id", 999999, "test"),
        ("pretrain_id", -5, "pretrain"),
    ],
)
def test_scores_ids_are_checked_from_the_footer_only(
    good_run, tmp_path, monkeypatch, column, value, owner
):
    run = copy_run(good_run, tmp_path / "run")
    scores_with(good_run, run, column, value)
    # opening a run must never read scores.parquet's rows: it can hold hundreds of millions
    original = pq.read_table

    def no_scores_rows(source, *args, **kwargs):
        assert not str(source).endswith("scores.parquet"), "read the rows of scores.parquet"
        return original(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", no_scores_rows)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read scores"))
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda *a, **k: pytest.fail("iter"))
    assert error_of(run) == (
        f"scores.parquet names {column} {value}, which {owner}.parquet does not hold"
    )


def test_a_scores_id_between_valid_ones_is_caught_when_that_test_is_read(good_run, tmp_path):
    run = copy_run(good_run, tmp_path / "run")
    top = pq.read_table(run / "top.parquet").to_pandas()
    gap = next(i for i in range(1, 59) if i not in set(top["pretrain_id"]))
    rewrite(run, "pretrain", lambda f: f[f["pretrain_id"] != gap])
    pretrain, _ = check_ids(run)  # the footer's min and max (0 and 59) are both held
    assert gap not in pretrain
    with pytest.raises(RunError) as caught:
        read_test_scores_checked(run, "fixed", 2, pretrain)
    assert str(caught.value) == (
        f"scores.parquet names pretrain_id {gap} for test 2 of scenario 'fixed', which "
        "pretrain.parquet does not hold"
    )
    frame = read_test_scores_checked(good_run, "fixed", 2, pd.Index(range(60)))
    assert len(frame) == 60


def test_scores_ids_of_the_wrong_type_are_named(good_run, tmp_path):
    run = copy_run(good_run, tmp_path / "run")
    rewrite(run, "scores", lambda f: f.assign(pretrain_id=f["pretrain_id"].astype(str)))
    message = error_of(run)  # pandas writes string or large_string
    assert message.startswith("scores.parquet holds pretrain_id of type ")
    assert message.endswith("string, not whole numbers")


def test_unconverged_tests_are_read_and_checked():
    ids = pd.Index(range(6))
    assert unconverged_tests({}) == {}
    assert unconverged_tests({"unconverged_tests": {"fixed": [1, 4]}}, ids) == {"fixed": [1, 4]}
    with pytest.raises(RunError, match=r"names test_id 77 \(scenario 'fixed'\), which test"):
        unconverged_tests({"unconverged_tests": {"fixed": [1, 77]}}, ids)
    with pytest.raises(RunError, match="is not a list of test ids"):
        unconverged_tests({"unconverged_tests": {"fixed": "1"}}, ids)
    with pytest.raises(RunError, match="is not a map from scenario to test ids"):
        unconverged_tests({"unconverged_tests": [1]}, ids)


# --- msif validate ----------------------------------------------------------------------------


def validate_error(run: Path, capsys) -> str:
    """Run `msif validate` on `run`; assert exit code 2 and one line; return that line."""
    code = main(["validate", "--task", TINY_TASK, "--run", str(run), "--n", "2", "--tests", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_validate_names_a_top_id_out_of_range(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    top = pq.read_table(run / "top.parquet").to_pandas()
    rank1 = top.index[top["rank"] == 1]
    rewrite(
        run,
        "top",
        lambda f: f.assign(pretrain_id=f["pretrain_id"].where(~f.index.isin(rank1), 999999)),
    )
    assert validate_error(run, capsys) == (
        "msif: error: top.parquet names pretrain_id 999999, which pretrain.parquet does not hold"
    )


def test_validate_names_a_scores_id_out_of_range(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    rewrite(run, "scores", set_first("test_id", 999999))
    assert validate_error(run, capsys) == (
        "msif: error: scores.parquet names test_id 999999, which test.parquet does not hold"
    )


def test_validate_needs_ids_that_are_positions(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    for name in ("pretrain", "top", "scores"):
        rewrite(run, name, lambda f: f.assign(pretrain_id=f["pretrain_id"] + 1000))
    line = validate_error(run, capsys)
    assert line.startswith("msif: error: pretrain.parquet holds pretrain_id 1000: msif validate")
