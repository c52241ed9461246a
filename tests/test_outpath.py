"""Nothing of the user's is lost: where `msif precompute --out` may write, and msif's own
temporary folders (precompute.outpath)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from precompute.cli import main
from precompute.outpath import Claim, remove_stale

TINY = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"


def run_cli(out, *extra, capsys=None):
    code = main(["precompute", "--task", TINY, "--out", str(out), "--no-maps", *extra])
    err = capsys.readouterr().err.strip().splitlines() if capsys else []
    return code, err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (and its hidden ones) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def refused(code, err, *, phrase):
    assert code == 2
    assert len([line for line in err if line.startswith("msif: error: ")]) == 1
    assert phrase in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)


def users_folder(root: Path) -> Path:
    folder = root / "x"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    (folder / "sub" / "data.csv").write_text("1,2,3")
    return folder


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_folder_of_user_files_is_refused_and_untouched(tmp_path, capsys, overwrite):
    folder = users_folder(tmp_path)
    before = snapshot(tmp_path)
    code, err = run_cli(folder, *overwrite, capsys=capsys)
    refused(code, err, phrase="already exists and is not an msif run")
    assert "notes.txt" in err[-1]
    assert snapshot(tmp_path) == before  # not a file touched, no temporary folder left


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_git_clone_is_refused_and_untouched(tmp_path, capsys, overwrite):
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "README").write_text("my project")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(origin)], check=True)
    subprocess.run([*git, "-C", str(origin), "add", "README"], check=True)
    subprocess.run([*git, "-C", str(origin), "commit", "-qm", "first"], check=True)
    clone = tmp_path / "clone"
    subprocess.run([*git, "clone", "-q", str(origin), str(clone)], check=True)
    before = snapshot(tmp_path)
    code, err = run_cli(clone, *overwrite, capsys=capsys)
    refused(code, err, phrase="is not an msif run")
    assert ".git/" in err[-1]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_folder_of_runs_is_refused_and_untouched(tiny_run, tmp_path, capsys, overwrite):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(tiny_run, runs / "a")
    shutil.copytree(tiny_run, runs / "b")
    before = snapshot(tmp_path)
    code, err = run_cli(runs, *overwrite, capsys=capsys)
    refused(code, err, phrase="is not an msif run")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_working_directory_and_its_parents_are_refused(tmp_path, capsys, monkeypatch, overwrite):
    work = users_folder(tmp_path)
    monkeypatch.chdir(work / "sub")
    before = snapshot(tmp_path)
    for out in (".", "..", str(work), str(tmp_path)):
        code, err = run_cli(out, *overwrite, capsys=capsys)
        refused(code, err, phrase="working directory or one of its parents")
    assert snapshot(tmp_path) == before


def test_working_directory_holding_a_run_is_refused_even_with_overwrite(
    tiny_run, tmp_path, capsys, monkeypatch
):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    monkeypatch.chdir(copy)
    before = snapshot(copy)
    code, err = run_cli(".", "--overwrite", capsys=capsys)
    refused(code, err, phrase="working directory")
    assert snapshot(copy) == before


def test_mount_point_is_refused(capsys):
    mount = next(p for p in (Path("/proc"), Path("/sys"), Path("/dev")) if os.path.ismount(p))
    code, err = run_cli(mount, "--overwrite", capsys=capsys)
    refused(code, err, phrase="mount point")


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda p: p.write_text("a file"), "exists and is not a folder"),
        (lambda p: p.mkdir(), "is an empty folder"),
        (lambda p: p.symlink_to(p.parent / "elsewhere"), "symbolic link"),
    ],
)
def test_other_existing_paths_are_refused(tmp_path, capsys, make, phrase):
    out = tmp_path / "out"
    make(out)
    before = snapshot(tmp_path)
    code, err = run_cli(out, "--overwrite", capsys=capsys)
    refused(code, err, phrase=phrase)
    assert snapshot(tmp_path) == before


def test_a_path_under_a_file_is_refused_up_front(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    code, err = run_cli(tmp_path / "file.txt" / "run", capsys=capsys)
    refused(code, err, phrase="is a file, not a folder")


def test_msif_run_is_replaced_only_with_overwrite(tiny_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    before = snapshot(copy)
    code, err = run_cli(copy, capsys=capsys)
    refused(code, err, phrase="already holds an msif run; pass --overwrite")
    assert snapshot(copy) == before
    code, _ = run_cli(copy, "--overwrite", capsys=capsys)
    assert code == 0
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["generator"] == "msif" and "manifest.json" in manifest["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_run_holding_user_files_is_not_replaced(tiny_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    (copy / "my_analysis.ipynb").write_text("{}")
    before = snapshot(tmp_path)
    code, err = run_cli(copy, "--overwrite", capsys=capsys)
    refused(code, err, phrase="which msif did not write")
    assert "my_analysis.ipynb" in err[-1]
    assert snapshot(tmp_path) == before


def test_manifest_is_strict_json(tiny_run):
    text = (tiny_run / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"manifest holds {name}"))


def test_killed_run_then_a_successful_one_leaves_only_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    spec = f"{Path(__file__).parent / 'tiny_task.py'}:SlowTask"
    command = [sys.executable, "-m", "precompute.cli", "precompute", "--task", spec]
    process = subprocess.Popen(
        [*command, "--out", str(out), "--no-maps"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".run.tmp-*/.msif-writer.json")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(0.5)  # well inside describe() now
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    leftovers = list(tmp_path.glob(".run.tmp-*"))
    assert len(leftovers) == 1 and not out.exists()
    # a folder that merely looks like msif's (no marker) is not msif's to delete
    lookalike = tmp_path / ".run.tmp-userdata"
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("mine")
    code, _ = run_cli(out, capsys=capsys)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.tmp-userdata", "run"]
    assert (lookalike / "keep.txt").read_text() == "mine"


def test_temporary_folder_of_a_live_writer_is_kept(tmp_path):
    out = tmp_path / "run"
    live = tmp_path / ".run.tmp-live0000"
    live.mkdir()
    claim = Claim(live, out)
    other = tmp_path / ".other.tmp-dead0000"  # another run's: not ours to judge
    other.mkdir()
    Claim(other, tmp_path / "other").release()
    try:
        assert remove_stale(out) == []
        assert live.is_dir() and other.is_dir()
    finally:
        claim.release()
    assert remove_stale(out) == [live]
    assert other.is_dir()


def test_leftover_of_a_replaced_run_is_removed(tiny_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    shutil.copytree(tiny_run, tmp_path / ".run.old-0badc0de")  # killed while deleting it
    code, _ = run_cli(copy, "--overwrite", capsys=capsys)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
