"""Bad ids and unconverged solves in the app: one sentence in the page, never a phantom card."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apptest_pages import html_of, notes

from explorer.state import VIEWS
from explorer.synthetic import write_synthetic_run
from precompute.cli import main
from precompute.rundir import read_manifest


def copy_with(run: Path, out: Path, name: str, edit) -> Path:
    """A copy of `run` (real files, not links) with `name`.parquet replaced by edit(frame)."""
    shutil.copytree(run, out)
    frame = pq.read_table(out / f"{name}.parquet").to_pandas()
    pq.write_table(pa.Table.from_pandas(edit(frame), preserve_index=False), out / f"{name}.parquet")
    return out


def first_row(column: str, value):
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame.loc[0, column] = value
        return frame

    return edit


def assert_no_phantom(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    body = html_of(at)
    assert "(no image or text)" not in body and "#999999" not in body


@pytest.mark.parametrize(
    ("table", "column", "value", "sentence"),
    [
        ("top", "pretrain_id", 999999, "top.parquet names pretrain_id 999999, which "
         "pretrain.parquet does not hold"),
        ("top", "test_id", 999999, "top.parquet names test_id 999999, which test.parquet "
         "does not hold"),
        ("scores", "pretrain_id", 999999, "scores.parquet names pretrain_id 999999, which "
         "pretrain.parquet does not hold"),
        ("predictions", "test_id", 999999, "predictions.parquet names test_id 999999, which "
         "test.parquet does not hold"),
        ("test", "test_id", 1, "test.parquet holds test_id 1 more than once"),
    ],
)  # fmt: skip
def test_an_id_out_of_range_is_one_sentence_in_the_page(
    app, image_run, tmp_path, table, column, value, sentence
):
    run = copy_with(image_run, tmp_path / "run", table, first_row(column, value))
    at = app(run, test=0)
    assert_no_phantom(at)
    assert notes(at, "error") == [f"This run cannot be shown: {sentence}"]


def test_a_scores_id_between_valid_ones_is_an_error_not_a_card(app, image_run, tmp_path):
    top = pq.read_table(image_run / "top.parquet").to_pandas()
    gap = next(i for i in range(1, 599) if i not in set(top["pretrain_id"]))
    run = copy_with(image_run, tmp_path / "run", "pretrain", lambda f: f[f.pretrain_id != gap])
    for view in ("examples", "distribution", "classes", "compare", "map"):
        at = app(run, test=3, scenario="fixed", view=view)
        assert_no_phantom(at)
        errors = notes(at, "error")
        assert len(errors) == 1, (view, errors)
        assert errors[0].startswith("This test's scores cannot be shown: scores.parquet names ")
        assert f"pretrain_id {gap} for test 3" in errors[0]
        if view == "map":  # nor is the blank chart that stands for the map while it is drawn
            assert not at.get("plotly_chart")


# --- unconverged solves (runs made with --allow-unconverged) ---------------------------------

SOLVER = {
    "fixed": {"solver": "cg", "tolerance": 1e-6, "max_relative_residual": 0.03},
    "updated": {"solver": "cg", "tolerance": 1e-6, "max_relative_residual": 2e-7},
    "pretrain": {"solver": "ekfac", "damping": 0.1},
}


@pytest.fixture(scope="module")
def unconverged_run(tmp_path_factory) -> Path:
    return write_synthetic_run(
        tmp_path_factory.mktemp("runs") / "unconverged",
        120,
        8,
        seed=4,
        manifest={
            "allow_unconverged": True,
            "unconverged_tests": {"fixed": [2, 5], "updated": []},
            "solver": SOLVER,
        },
    )


def banner(at) -> list[str]:
    return [n for n in notes(at, "warning") if "did not converge" in n]


@pytest.mark.parametrize("view", list(VIEWS))
def test_every_view_of_an_unconverged_test_shows_the_banner(app, unconverged_run, view):
    at = app(unconverged_run, test=5, scenario="fixed", view=view)
    assert not at.exception, [e.value for e in at.exception]
    assert banner(at) == [
        "The influence solve did not converge for test 5 in the fixed scenario, so its scores "
        "are unreliable (the run was made with --allow-unconverged): the fixed finetuning "
        "solve (cg) reached a relative residual of 0.03 against a tolerance of 1e-06."
    ]


def test_converged_tests_show_no_banner(app, unconverged_run):
    for test, scenario in ((3, "fixed"), (2, "updated"), (0, "fixed")):
        at = app(unconverged_run, test=test, scenario=scenario)
        assert not at.exception
        assert banner(at) == [], (test, scenario)
    at = app(unconverged_run, test=2, scenario="fixed")
    assert len(banner(at)) == 1
    labels = {
        int(o.split(" · ")[0].removeprefix("Test ")): o
        for o in at.selectbox(key="test_pick").options
    }
    assert labels[2].endswith(" · solve not converged") and labels[5].endswith("not converged")
    assert "not converged" not in labels[3]


def test_a_banner_without_solver_details_still_says_it(app, tmp_path):
    run = write_synthetic_run(
        tmp_path / "run", 60, 4, seed=5, manifest={"unconverged_tests": {"updated": [1]}}
    )
    at = app(run, test=1, scenario="updated")
    assert banner(at) == [
        "The influence solve did not converge for test 1 in the updated scenario, so its "
        "scores are unreliable (the run was made with --allow-unconverged)."
    ]


def test_unconverged_tests_naming_an_unknown_test_is_one_sentence(app, tmp_path):
    run = write_synthetic_run(
        tmp_path / "run", 60, 4, seed=5, manifest={"unconverged_tests": {"fixed": [1, 40]}}
    )
    at = app(run, test=1)
    assert not at.exception
    assert notes(at, "error") == [
        "This run cannot be shown: manifest.json's unconverged_tests names test_id 40 (scenario "
        "'fixed'), which test.parquet does not hold"
    ]


@pytest.mark.slow  # runs the whole precompute pipeline (tiny task)
def test_a_run_written_with_allow_unconverged_has_a_banner_on_every_affected_test(app, tmp_path):
    """The engine's own manifest (msif precompute --allow-unconverged, cg stopped after one
    iteration): every listed (scenario, test) shows the banner."""
    task = Path(__file__).resolve().parents[1] / "tiny_task.py"
    out = tmp_path / "run"
    argv = ["precompute", "--task", f"{task}:TinyTask", "--out", str(out), "--solver", "cg"]
    argv += ["--cg-max-iter", "1", "--cg-tol", "1e-12", "--allow-unconverged", "--no-maps"]
    assert main(argv) == 0
    unconverged = read_manifest(out)["unconverged_tests"]
    pairs = [(s, t) for s, tests in unconverged.items() for t in tests]
    assert pairs, "one cg iteration at tolerance 1e-12 should leave tests unconverged"
    for scenario, test in pairs:
        at = app(out, test=test, scenario=scenario)
        assert not at.exception
        shown = banner(at)
        assert len(shown) == 1 and f"for test {test} in the {scenario} scenario" in shown[0]
        assert "relative residual of" in shown[0]
