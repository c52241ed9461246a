"""`ray start --head` on this machine, then `RAY_ADDRESS=... msif precompute --engine ray`, as a
user runs it: the run equals the local engine's. The head is started (and stopped) by this test
only, in its own temporary folder; nothing else in the environment is set, so this also covers
reaching a head that uses Ray's token authentication (the default of `ray start` since 2.59)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from precompute.rundir import read_manifest, read_table

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

TASK = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head():
    """RAY_ADDRESS of a head started with `ray start --head --block` (stopped by SIGTERM)."""
    port = free_port()
    folder = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are limited
    command = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--block",
               "--include-dashboard=false", "--disable-usage-stats",
               f"--temp-dir={folder}"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def precompute_cli(out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "precompute.cli", "precompute", "--task", TASK, "--out",
               str(out), "--solver", "cg", "--full-scores", "on", "--no-maps", *extra]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_a_head_started_with_ray_start_gives_the_local_run(head, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    local = precompute_cli(tmp_path / "local", env)
    assert local.returncode == 0, local.stderr
    done = precompute_cli(tmp_path / "ray", {**env, "RAY_ADDRESS": head}, "--engine", "ray")
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "ray")
    assert manifest["pretraining_pass"]["address"] == head
    assert manifest["pretraining_pass"]["workers"] == 2
    assert manifest["solver"]["pretrain"]["engine"] == "ray"
    for table in ("scores", "top"):
        assert read_table(tmp_path / "ray", table).equals(read_table(tmp_path / "local", table))
