"""Readers and summaries of explorer/data.py, the synthetic run writer, and the launcher."""

from __future__ import annotations

import socket
import subprocess
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest

from explorer import data, launch
from precompute.rundir import read_manifest, read_table, read_test_scores


def test_synthetic_run_follows_the_documented_format(image_run):
    manifest = read_manifest(image_run)
    assert manifest["complete"] and manifest["full_scores"] and manifest["top_k"] == 10
    scores = pq.ParquetFile(image_run / "scores.parquet")
    assert scores.metadata.num_rows == 2 * 24 * 600
    table = scores.read(columns=["scenario", "test_id"]).to_pandas()
    keys = list(zip(table["scenario"], table["test_id"], strict=True))
    assert keys == sorted(keys), "scores.parquet must be sorted by (scenario, test_id)"
    assert scores.metadata.num_row_groups > 1
    pretrain = read_table(image_run, "pretrain")
    assert pretrain["image_png"].str[:4].eq(b"\x89PNG").all() and pretrain["text"].isna().all()


def test_top_lists_agree_with_full_scores(image_run):
    top = read_table(image_run, "top")
    for scenario in ("fixed", "updated"):
        scores = read_test_scores(image_run, scenario, 5).set_index("pretrain_id")["score"]
        rows = top[(top["scenario"] == scenario) & (top["test_id"] == 5)]
        helpful = rows[rows["kind"] == "helpful"].sort_values("rank")
        harmful = rows[rows["kind"] == "harmful"].sort_values("rank")
        assert helpful["pretrain_id"].tolist() == scores.nlargest(10).index.tolist()
        assert harmful["pretrain_id"].tolist() == scores.nsmallest(10).index.tolist()
        assert np.allclose(helpful["score"], scores.loc[helpful["pretrain_id"]])
        assert (helpful["score"] > 0).all() and (harmful["score"] < 0).all()


def test_text_run_has_text_and_no_images(text_run):
    pretrain = read_table(text_run, "pretrain")
    assert pretrain["image_png"].isna().all() and pretrain["text"].notna().all()
    assert pretrain["text"].str.contains("<b>x</b> **y**", regex=False).any()
    assert not (text_run / "scores.parquet").exists()


def test_influence_mass_counts_examples_by_largest_share():
    # |scores| 5, 3, 1, 1 (total 10): 50% needs 1 example, 80% needs 2, 95% needs 4
    assert data.influence_mass(np.array([1.0, -5.0, 3.0, -1.0])) == {0.5: 1, 0.8: 2, 0.95: 4}
    assert data.influence_mass(np.zeros(3)) == {0.5: 0, 0.8: 0, 0.95: 0}


def test_removal_estimate_is_the_sum_of_scores(image_run, text_run):
    run = data.load_run(image_run)
    removed = [3, 17, 250]
    change, source = data.removal_estimate(run, "fixed", removed, [0, 1, 2])
    assert "scores.parquet" in source
    for test_id in (0, 1, 2):
        scores = read_test_scores(image_run, "fixed", test_id).set_index("pretrain_id")["score"]
        assert change[test_id] == pytest.approx(float(scores.loc[removed].sum()), rel=1e-5)

    run = data.load_run(text_run)
    top = run.top[(run.top["scenario"] == "fixed") & (run.top["test_id"] == 0)]
    removed = top["pretrain_id"].head(3).tolist()
    change, source = data.removal_estimate(run, "fixed", removed, [0])
    assert "top-k lists only" in source
    assert change[0] == pytest.approx(float(top["score"].head(3).sum()), rel=1e-5)


def test_harmful_counts_count_appearances_in_harmful_lists(image_run):
    run = data.load_run(image_run)
    counts = data.harmful_counts(run, "fixed")
    top = run.top[(run.top["scenario"] == "fixed") & (run.top["kind"] == "harmful")]
    first = counts.iloc[0]
    assert first["harmful_to_tests"] == (top["pretrain_id"] == first["pretrain_id"]).sum()
    assert first["harmful_to_tests"] == counts["harmful_to_tests"].max()


def test_class_heatmap_has_same_class_help(image_run):
    heat, source = data.class_heatmap(data.load_run(image_run), "fixed")
    assert "scores.parquet" in source
    shared = [c for c in heat.index if c in heat.columns]
    diagonal = np.array([heat.loc[c, c] for c in shared])
    assert (diagonal > 0).all(), "same-class pretraining examples help on average"


def test_launch_command_binds_localhost_and_ships_a_light_theme():
    command = launch.command(8765)
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[command.index("--server.port") + 1] == "8765"
    config = (launch.PACKAGE_DIR / ".streamlit" / "config.toml").read_text()
    assert 'base = "light"' in config


@pytest.mark.slow
def test_start_serves_the_app(image_run):
    process, port = launch.start(image_run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        launch.wait_until_healthy(port, process)
        assert launch.warm_up(port), "the app script should run without an error"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        launch.stop(process)


@pytest.mark.slow
def test_serve_reports_a_port_in_use(image_run, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code = launch.serve(image_run, busy.getsockname()[1])
    assert code != 0
    assert "msif explore:" in capsys.readouterr().err
