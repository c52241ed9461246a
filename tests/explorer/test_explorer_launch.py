"""`msif explore` refuses what it cannot serve in one sentence, before streamlit starts."""

from __future__ import annotations

import shutil
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explorer import launch
from explorer.__main__ import main as module_main
from precompute.cli import main as cli_main


@pytest.fixture(autouse=True)
def no_streamlit(monkeypatch):
    """Any attempt to start streamlit fails the test: every case here must stop before."""

    def refuse(*args, **kwargs):
        raise AssertionError("streamlit was started")

    monkeypatch.setattr(launch, "start", refuse)


def refused(capsys, target, port=None) -> str:
    """serve(target, port): exit code 2, nothing on stdout, one line on stderr; that line."""
    code = launch.serve(target, port)
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    return err.rstrip("\n")


def test_missing_target(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert refused(capsys, missing) == f"msif explore: {missing} does not exist"


def test_target_that_is_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    line = refused(capsys, tmp_path / "notes.txt")
    assert line == (
        f"msif explore: {tmp_path / 'notes.txt'} is not a folder: give a run directory or a "
        "folder of runs"
    )


def test_folder_without_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other").mkdir()
    line = refused(capsys, tmp_path / "empty")
    assert line.startswith(f"msif explore: {tmp_path / 'empty'} holds no msif run: ")


def test_incomplete_run(image_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(image_run, run)
    (run / "manifest.json").unlink()
    line = refused(capsys, run)
    assert line == f"msif explore: {run} has no manifest.json: it is not a finished msif run"


def test_run_with_an_id_out_of_range(image_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(image_run, run)
    top = pq.read_table(run / "top.parquet").to_pandas()
    top.loc[3, "pretrain_id"] = 999999
    pq.write_table(pa.Table.from_pandas(top, preserve_index=False), run / "top.parquet")
    assert refused(capsys, run) == (
        f"msif explore: {run}: top.parquet names pretrain_id 999999, which pretrain.parquet "
        "does not hold"
    )


@pytest.mark.parametrize("port", [99999, 65536, 0, -1])
def test_port_out_of_range(image_run, capsys, port):
    assert refused(capsys, image_run, port) == (
        f"msif explore: port {port} is out of range: give a port from 1 to 65535"
    )


@pytest.mark.parametrize("port", ["8501", 8501.0, True])
def test_port_that_is_not_an_integer(image_run, capsys, port):
    assert refused(capsys, image_run, port) == f"msif explore: port {port!r} is not an integer"


@pytest.mark.parametrize("listen", [True, False])
def test_busy_port_is_named_before_streamlit_starts(image_run, capsys, listen):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        if listen:
            busy.listen()
        port = busy.getsockname()[1]
        assert refused(capsys, image_run, port) == (
            f"msif explore: port {port} on 127.0.0.1 is already in use: pick another with --port"
        )


def test_good_targets_and_a_free_port_pass_the_checks(image_run, text_run, tmp_path):
    assert launch.target_problem(image_run) is None
    (tmp_path / "a").symlink_to(image_run)
    (tmp_path / "b").symlink_to(text_run)
    assert launch.target_problem(tmp_path) is None
    assert launch.port_problem(launch.free_port()) is None


def test_cli_explore_on_a_missing_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli_main(["explore", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"msif explore: {missing} does not exist\n"


@pytest.mark.parametrize("main", [cli_main, module_main])
def test_command_line_port_out_of_range(main, image_run, capsys):
    argv = ["explore"] if main is cli_main else []
    try:
        code = main([*argv, str(image_run), "--port", "99999"])
    except SystemExit as exc:  # argparse rejects it
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "65535" in err, err
    assert err.strip().splitlines()[-1].count("99999") == 1
