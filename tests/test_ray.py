"""--engine ray against a real local Ray cluster (two worker processes, no mocks): the same
run as the local engine, a worker killed mid-shard retried, resumable, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_task import ParquetTinyTask, SlowLossTask, TinyTask

from precompute import pipeline
from precompute.pipeline import PrecomputeConfig, precompute
from precompute.rundir import read_manifest, read_table

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

CONFIG = dict(solver="exact", top_k=5, full_scores="on", maps=False, device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray instance with two CPUs, started (and stopped) by these tests only; its
    workers note their process ids in the returned folder when they score."""
    assert not ray.is_initialized()
    pids = tmp_path_factory.mktemp("pids")
    path = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    env = {"PYTHONPATH": path, "MSIF_TEST_PIDS": str(pids)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})  # fmt: skip
    yield pids
    ray.shutdown()


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(pipeline, "shard_size", lambda m, batch_size: 32)  # 7 shards of 200


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    return precompute(TinyTask(), out, PrecomputeConfig(**CONFIG), log=lambda m: None)


def assert_same(ray_run: Path, local_run: Path) -> None:
    a, b = read_table(ray_run, "scores"), read_table(local_run, "scores")
    assert (
        (a[["scenario", "test_id", "pretrain_id"]] == b[["scenario", "test_id", "pretrain_id"]])
        .all()
        .all()
    )
    scale = b["score"].abs().max()
    assert (a["score"] - b["score"]).abs().max() <= 1e-5 * scale
    assert read_table(ray_run, "top").equals(read_table(local_run, "top"))


def test_ray_engine_equals_the_local_engine(cluster, small_shards, tmp_path, local_run):
    run = precompute(TinyTask(), tmp_path / "r", PrecomputeConfig(**CONFIG, engine="ray"),
                     log=lambda m: None)  # fmt: skip
    assert_same(run, local_run)
    manifest = read_manifest(run)
    assert manifest["engine"] == "ray"
    assert manifest["pretraining_pass"]["workers"] == 2
    assert manifest["pretraining_pass"]["shards"] == 7
    assert manifest["pretraining_pass"]["path"] == "layers"


@pytest.mark.parametrize("solver", ["cg", "pcg", "ekfac"])
def test_the_pretraining_solve_on_ray_equals_the_local_solve(
    cluster, tmp_path, solver, monkeypatch
):
    """The solve's curvature products and EK-FAC statistics summed block by block on the
    workers and added in the local engine's order: the same s-vectors, so the same scores."""
    from precompute import ekfac, objective

    # batches of 16 (the configured size) for products and EK-FAC: 13 blocks over two workers
    monkeypatch.setattr(
        objective.Objective, "product_shape", lambda self, rows: (max(1, rows), self.batch_size)
    )
    monkeypatch.setattr(ekfac, "FIT_BUDGET", 1)
    from precompute.ray_engine import RayCurvature

    blocks, in_order = [], RayCurvature._in_order

    def spy(self, parts, call):
        blocks.append(len(parts))
        return in_order(self, parts, call)

    monkeypatch.setattr(RayCurvature, "_in_order", spy)
    config = {**CONFIG, "solver": solver}
    local = precompute(TinyTask(), tmp_path / "l", PrecomputeConfig(**config), log=lambda m: None)
    run = precompute(TinyTask(), tmp_path / "r", PrecomputeConfig(**config, engine="ray"),
                     log=lambda m: None)  # fmt: skip
    assert_same(run, local)
    assert read_table(run, "scores")["score"].equals(read_table(local, "scores")["score"])
    solve = read_manifest(run)["solver"]["pretrain"]
    assert solve["solver"] == solver and solve["engine"] == "ray" and solve["workers"] == 2
    assert "engine" not in read_manifest(local)["solver"]["pretrain"]
    assert min(blocks) == 13  # every sum taken in blocks spread over both workers
    if solver != "ekfac":
        assert solve["iterations"] == read_manifest(local)["solver"]["pretrain"]["iterations"]


def test_workers_read_parquet_shards_themselves(cluster, small_shards, tmp_path, local_run):
    run = precompute(ParquetTinyTask(), tmp_path / "r", PrecomputeConfig(**CONFIG, engine="ray"),
                     log=lambda m: None)  # fmt: skip
    assert read_manifest(run)["pretraining_pass"]["data"] == "read by the workers"
    assert_same(run, local_run)


def test_a_worker_killed_mid_shard_is_retried(cluster, small_shards, tmp_path, local_run):
    killed = []

    def kill_one_worker():  # once a shard is finished, a worker busy on the next one
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if list(tmp_path.glob(".r.tmp-*/state/pass/shard-*.pt")):
                # the pass's workers: the processes that noted themselves last (the solve's
                # workers noted themselves too, and were stopped when it ended)
                recent = sorted(cluster.iterdir(), key=lambda p: p.stat().st_mtime)[-2:]
                for pid in [int(p.name) for p in recent if int(p.name) != os.getpid()]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    killed.append(pid)
                    break
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    messages = []
    run = precompute(SlowLossTask(), tmp_path / "r", PrecomputeConfig(**CONFIG, engine="ray"),
                     log=messages.append)  # fmt: skip
    killer.join()
    assert killed, "no worker was killed"
    assert any("a Ray worker died" in m for m in messages)
    assert_same(run, local_run)  # nothing lost, nothing counted twice


def test_unreachable_cluster_is_one_sentence_before_any_work(tmp_path):
    spec = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    command = [sys.executable, "-m", "precompute.cli", "precompute", "--task", spec, "--out",
               str(tmp_path / "r"), "--engine", "ray", "--no-maps"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("msif: error: nothing answers at RAY_ADDRESS=127.0.0.1:9")
    )
    assert "[msif] load" not in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failed_ray_job_resumes(cluster, small_shards, tmp_path, local_run, monkeypatch):
    from precompute.scoring import ShardStore

    real, saved = ShardStore.save, []

    def fail_on_the_third(self, shard, top):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(shard)
        real(self, shard, top)

    monkeypatch.setattr(ShardStore, "save", fail_on_the_third)
    config = PrecomputeConfig(**CONFIG, engine="ray")
    with pytest.raises(KeyboardInterrupt):
        precompute(TinyTask(), tmp_path / "r", config, log=lambda m: None)
    monkeypatch.setattr(ShardStore, "save", real)
    config = PrecomputeConfig(**CONFIG, engine="ray", resume=True)
    run = precompute(TinyTask(), tmp_path / "r", config, log=lambda m: None)
    manifest = read_manifest(run)
    assert manifest["resumed"] is True and manifest["pretraining_pass"]["shards"] == 5
    assert_same(run, local_run)
