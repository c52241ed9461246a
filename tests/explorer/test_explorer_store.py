"""Reads that stay small (explorer/store.py) against the slow obvious reads of whole tables,
and the map raster (explorer/raster.py) against what it must draw."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explorer import data, raster, store
from precompute.rundir import TABLE_SCHEMAS, RunError, read_table, to_table


def write_pretrain(path, ids: np.ndarray, group: int = 128):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "pretrain_id": ids.astype(np.int64),
            "label": rng.integers(0, 3, len(ids)),
            "label_name": rng.choice(["a", "b", None], len(ids)),
            "text": [f"row {i} {'needle' if i % 7 == 0 else 'hay'} <b>x</b>" for i in ids],
            "image_png": None,
            "umap_x": rng.normal(size=len(ids)).astype(np.float32),
            "umap_y": rng.normal(size=len(ids)).astype(np.float32),
        }
    )
    pq.write_table(to_table("pretrain", frame), path, row_group_size=group)
    return frame.set_index("pretrain_id", drop=False)


def write_scores(path, blocks: list[pd.DataFrame], **kwargs) -> None:
    """One row group per frame in `blocks`."""
    with pq.ParquetWriter(path, TABLE_SCHEMAS["scores"], **kwargs) as writer:
        for block in blocks:
            writer.write_table(
                pa.Table.from_pandas(block, preserve_index=False).cast(writer.schema)
            )


def block(scenario: str, test_id: int, ids, seed: int) -> pd.DataFrame:
    ids = np.asarray(ids, dtype=np.int64)
    score = np.random.default_rng(seed).normal(size=len(ids)).astype(np.float32)
    return pd.DataFrame(
        {"scenario": scenario, "test_id": test_id, "pretrain_id": ids, "score": score}
    )


@pytest.fixture
def shuffled(tmp_path):
    """pretrain.parquet with 1,000 ids in a shuffled order (not 0..n-1), 128 rows a group."""
    ids = np.random.default_rng(1).permutation(np.arange(5000, 6000))
    return tmp_path / "pretrain.parquet", write_pretrain(tmp_path / "pretrain.parquet", ids)


def test_rows_read_only_the_groups_holding_the_ids(shuffled, monkeypatch):
    path, frame = shuffled
    pretrain = store.load_pretrain(path)
    assert pretrain.has_text and not pretrain.has_images
    assert "text" not in pretrain.frame and len(pretrain.group_starts) == 9  # 8 groups + end
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda self, i, **kw: read.append(i) or original(self, i, **kw),
    )
    wanted = [int(frame.index[900]), int(frame.index[3]), 123456, int(frame.index[5])]
    rows = pretrain.rows(wanted)
    assert rows.index.tolist() == [wanted[0], wanted[1], wanted[3]]  # the unknown id left out
    expected = read_table(path.parent, "pretrain").set_index("pretrain_id").loc[rows.index]
    assert rows["text"].tolist() == expected["text"].tolist()
    assert rows["label_name"].astype(object).tolist() == expected["label_name"].tolist()
    assert sorted(read) == [0, 7]  # rows 3 and 5 share the first group, row 900 is in the last


def test_scores_are_read_from_their_row_groups_and_aligned(shuffled, monkeypatch):
    path, frame = shuffled
    pretrain = store.load_pretrain(path)
    ids = frame.index.to_numpy()
    blocks = [
        block("fixed", 0, ids, 0),
        block("fixed", 1, np.random.default_rng(2).permutation(ids[10:]), 1),  # shuffled, partial
        pd.concat([block("updated", 0, ids, 2), block("updated", 1, ids, 3)]),  # two tests
    ]
    scores_path = path.parent / "scores.parquet"
    write_scores(scores_path, blocks)
    index = store.scores_index(scores_path, ["fixed", "updated"], [0, 1])
    assert index.groups[("fixed", 1)] == [1] and index.mixed == {2}
    read = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_groups",
        lambda self, groups, **kw: read.append(list(groups)) or original(self, groups, **kw),
    )
    whole = pq.read_table(scores_path).to_pandas()
    for scenario, test_id in (("fixed", 0), ("fixed", 1), ("updated", 1)):
        values = store.read_scores(index, pretrain, scenario, test_id)
        rows = whole[(whole["scenario"] == scenario) & (whole["test_id"] == test_id)]
        expected = rows.set_index("pretrain_id")["score"].reindex(ids).to_numpy()
        np.testing.assert_array_equal(values, expected)  # NaN where no score is stored
        assert not values.flags.writeable
    assert read == [[0], [1], [2]]
    assert np.isnan(store.read_scores(index, pretrain, "fixed", 1)[:10]).all()
    assert store.read_scores(index, pretrain, "fixed", 7) is None


@pytest.mark.parametrize(
    ("edit", "sentence"),
    [
        (lambda ids: np.append(ids[1:], 99), "names pretrain_id 99 for test 0 of scenario 'fixed'"),
        (lambda ids: np.append(ids[1:], ids[1]), "holds pretrain_id {} more than once"),
    ],
)
def test_scores_naming_unknown_or_repeated_ids_are_one_sentence(shuffled, edit, sentence):
    path, frame = shuffled
    pretrain = store.load_pretrain(path)
    ids = edit(frame.index.to_numpy())
    write_scores(path.parent / "scores.parquet", [block("fixed", 0, ids, 0)])
    index = store.scores_index(path.parent / "scores.parquet", ["fixed"], [0])
    with pytest.raises(RunError) as error:
        store.read_scores(index, pretrain, "fixed", 0)
    assert sentence.format(frame.index[1]) in str(error.value)


def test_scores_without_statistics_fall_back_to_a_filtered_read(shuffled):
    path, frame = shuffled
    pretrain = store.load_pretrain(path)
    ids = frame.index.to_numpy()
    scores_path = path.parent / "scores.parquet"
    write_scores(scores_path, [block("fixed", 0, ids, 0), block("fixed", 1, ids, 1)],
                 write_statistics=False)  # fmt: skip
    index = store.scores_index(scores_path, ["fixed"], [0, 1])
    assert index.groups is None
    values = store.read_scores(index, pretrain, "fixed", 1)
    np.testing.assert_array_equal(values, block("fixed", 1, ids, 1)["score"].to_numpy())


def test_text_search_matches_a_case_insensitive_scan(shuffled):
    path, frame = shuffled
    found, total = store.search_text(path, "NEEDLE", limit=5)
    matches = frame[frame["text"].str.contains("needle", case=False)]
    assert total == len(matches) > 5
    assert found == matches["pretrain_id"].head(5).tolist()  # in row order
    assert store.search_text(path, "<b>x</b>", limit=3)[1] == len(frame)  # no regex, no markup


@pytest.mark.slow  # writes a run of 20,000 examples x 60 tests
def test_score_cache_is_bounded_whatever_the_number_of_tests(tmp_path):
    """Opening many tests keeps at most SCORE_CACHE_ENTRIES of them in memory."""
    from explorer.synthetic import write_synthetic_run

    run = data.load_run(write_synthetic_run(tmp_path / "run", 20_000, 60, images=False))
    data._score_values.clear()
    one = 20_000 * 4
    tracemalloc.start()
    try:
        for test_id in range(60):
            data.score_values(run, "fixed", test_id)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < (data.SCORE_CACHE_ENTRIES + 6) * one, held / one
    assert held > (data.SCORE_CACHE_ENTRIES - 2) * one  # the cache does keep its entries


# --- the raster ---------------------------------------------------------------------------------


def test_extent_round_trips_through_the_url_and_rejects_nonsense():
    extent = raster.Extent(-1.25, 3.5, 0.0, 2.0)
    assert raster.Extent.parse(extent.text()) == extent
    for text in ("1,2,3", "a,b,c,d", "1,0,0,1", "0,1,nan,1", "", None):
        assert raster.Extent.parse(text) is None


def test_points_land_in_their_pixels():
    extent = raster.Extent(0.0, 10.0, 0.0, 5.0)
    x = np.array([0.0, 9.99, 5.0, 11.0, np.nan])
    y = np.array([4.99, 0.0, 2.5, 1.0, 1.0])
    pixel = raster.pixels(x, y, extent, width=10, height=5)
    assert pixel.tolist() == [0, 4 * 10 + 9, 2 * 10 + 5, -1, -1]  # row 0 is the top


def test_score_image_colours_helpful_green_harmful_red_and_leaves_empty_pixels_clear():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(0, 1, 5000), rng.uniform(3, 4, 5000)])
    y = rng.uniform(0, 1, 10_000)
    scores = np.concatenate([np.full(5000, 2.0), np.full(5000, -1.0)]).astype(np.float32)
    extent = raster.Extent(0, 4, 0, 1)
    image, limit = raster.score_image(raster.pixels(x, y, extent, 40, 10), scores, 40, 10)
    assert limit == pytest.approx(2.0)
    left, right, gap = image[5, 5], image[5, 35], image[5, 20]
    assert tuple(left[:3]) == raster.HELPFUL_RGB and left[3] > 200
    red = np.array(raster.HARMFUL_RGB) * 0.5 + np.array(raster.MIDDLE_RGB) * 0.5  # -1 of 2
    assert np.allclose(right[:3], red, atol=2) and right[3] > 200
    assert gap[3] == 0


def test_sparse_maps_draw_discs_and_dense_maps_single_pixels():
    assert raster.radius(1_000_000) == 0 and raster.radius(600) == 3
    image, _ = raster.score_image(np.array([50 * 101 + 50]), np.array([1.0]), 101, 101)
    assert (image[..., 3] > 0).sum() == 7 + 2 * 7 + 2 * 5 + 2 * 3  # the disc of radius 3


@pytest.mark.parametrize("n", [1_000_000 // 50, 400])  # dense (one pixel each) and sparse (discs)
def test_a_maps_shared_density_draws_the_same_image_as_a_whole_pass(n):
    """The per-run `density` only saves work: with it, every test's image is the same, NaN
    scores (left out of the density) included."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=n), rng.normal(size=n)
    pixel = raster.pixels(x, y, raster.Extent(-2.5, 2.5, -2.5, 2.5), 120, 60)
    assert (pixel < 0).any()  # some examples fall outside the extent
    base = raster.density(pixel, 120, 60)
    for values in (rng.normal(size=n), np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n))):
        values = values.astype(np.float32)
        expected, limit = raster.score_image(pixel, values, 120, 60)
        image, shared_limit = raster.score_image(pixel, values, 120, 60, base=base)
        np.testing.assert_array_equal(image, expected)
        assert shared_limit == limit


def test_class_image_shows_the_commonest_class_per_pixel():
    pixel = np.array([0, 0, 0, 1, 1, 1, 1])
    codes = np.array([2, 2, 1, 0, 1, 1, 0])
    image = raster.class_image(pixel, codes, width=2, height=1)
    assert tuple(image[0, 0, :3]) == raster.PALETTE[2]
    assert tuple(image[0, 1, :3]) in (raster.PALETTE[0], raster.PALETTE[1])


def test_lasso_membership_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-1, 2, 2000), rng.uniform(-1, 2, 2000)
    px, py = np.array([0.0, 1.5, 1.0, 0.2]), np.array([0.0, 0.3, 1.6, 1.0])

    def inside(a, b):  # even-odd ray casting, one point at a time
        hit = False
        for i in range(len(px)):
            x1, y1, x2, y2 = px[i - 1], py[i - 1], px[i], py[i]
            if (y1 > b) != (y2 > b) and a < (x2 - x1) * (b - y1) / (y2 - y1) + x1:
                hit = not hit
        return hit

    expected = np.array([inside(a, b) for a, b in zip(x, y, strict=True)])
    assert expected.sum() > 100
    np.testing.assert_array_equal(raster.in_polygon(x, y, px, py), expected)
