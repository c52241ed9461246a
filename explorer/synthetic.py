"""Synthetic run directories in the documented format (docs/design.md section 5).

Used by the explorer's tests and its speed benchmark before (and besides) real engine runs. The
data look like a small digits problem: 8x8 (or 28x28) grayscale digit images, or short text rows,
UMAP coordinates as one gaussian cluster per class, and scores that follow the sign convention
score > 0 = HELPFUL (same class as the test) and score < 0 = HARMFUL (a confusable class).
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from precompute.rundir import TABLE_SCHEMAS, RunWriter

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# 5x7 bitmaps of the digits 0-9, the seed of every synthetic image.
_GLYPHS = (
    (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
)

# Text rows: a few topics; some rows carry HTML and markdown that must be shown as typed.
_TOPICS = ("sports", "science", "politics", "arts")
_WORDS = {
    "sports": ("match", "goal", "coach", "season", "league", "score"),
    "science": ("atom", "theory", "experiment", "cell", "orbit", "lab"),
    "politics": ("vote", "senate", "policy", "election", "minister", "law"),
    "arts": ("canvas", "museum", "novel", "sculpture", "opera", "poem"),
}
_TRICKY = ("<b>x</b> **y**", "<script>alert(1)</script>", "# not a heading", "`code` & <i>it</i>")

PRETRAIN_ROWS_PER_GROUP = 20_000

# Which class each class is most often confused with (the source of harmful examples).
_CONFUSED = {0: 6, 1: 7, 2: 3, 3: 8, 4: 9, 5: 6, 6: 5, 7: 1, 8: 3, 9: 4}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _draw_digit(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A digit glyph drawn at 32x32 with a random shift, slant and stroke, blurred and scaled
    down to `size` x `size`: white on black with soft edges, like the sklearn digits."""
    glyph = np.array([[c == "#" for c in row] for row in _GLYPHS[label]], dtype=float)
    canvas = np.zeros((32, 32))
    dy, dx = rng.integers(0, 5), rng.integers(3, 10)
    canvas[dy : dy + 28, dx : dx + 20] = np.kron(glyph, np.ones((4, 4)))
    shear = rng.uniform(-0.25, 0.25)
    for row in range(32):  # slant, as handwriting does
        canvas[row] = np.roll(canvas[row], int(round(shear * (16 - row))))
    for axis in (0, 1):  # a soft pen: blur with a [1, 2, 1] kernel, twice
        for _ in range(2):
            canvas = (np.roll(canvas, 1, axis) + 2 * canvas + np.roll(canvas, -1, axis)) / 4
    pixels = np.clip(canvas * 255 * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BOX), dtype=float)


def _digit_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> list[bytes]:
    """PNGs of the digits `labels`: each a random one of 48 drawn variants, plus pixel noise."""
    bank = [[_draw_digit(d, size, rng) for _ in range(48)] for d in range(10)]
    pngs = []
    for label in labels:
        pixels = bank[int(label)][int(rng.integers(0, 48))]
        pixels = pixels * 1.3 + rng.normal(scale=5, size=pixels.shape)
        pngs.append(_png(np.clip(pixels, 0, 255)))
    return pngs


def _text_row(label: int, index: int, rng: np.random.Generator) -> str:
    topic = _TOPICS[label]
    words = rng.choice(_WORDS[topic], size=int(rng.integers(4, 9)))
    text = f"Row {index}: a note about the {topic} " + " ".join(words) + "."
    if index % 7 == 0:
        text += " " + _TRICKY[(index // 7) % len(_TRICKY)]
    return text


def _examples(
    n: int,
    n_classes: int,
    centres: np.ndarray,
    images: bool,
    size: int,
    rng: np.random.Generator,
    names: tuple[str, ...],
) -> pd.DataFrame:
    labels = rng.integers(0, n_classes, size=n)
    xy = centres[labels] + rng.normal(scale=0.9, size=(n, 2))
    return pd.DataFrame(
        {
            "label": labels.astype(np.int64),
            "label_name": [names[c] for c in labels],
            "text": None if images else [_text_row(int(c), i, rng) for i, c in enumerate(labels)],
            "image_png": _digit_images(labels, size, rng) if images else None,
            "umap_x": xy[:, 0].astype(np.float32),
            "umap_y": xy[:, 1].astype(np.float32),
        }
    )


def _scores(
    test_labels: np.ndarray,
    pretrain_labels: np.ndarray,
    confused: np.ndarray,
    scale: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Scores [tests, pretrain]: same class helps, the confusable class harms, heavy tails."""
    same = pretrain_labels[None, :] == test_labels[:, None]
    harm = pretrain_labels[None, :] == confused[test_labels][:, None]
    mean = 1.0 * same - 0.8 * harm
    noise = rng.normal(scale=0.6, size=mean.shape)
    return ((mean + noise) * scale[None, :] * 1e-3).astype(np.float32)


def _top(scenario: str, test_ids: np.ndarray, scores: np.ndarray, k: int) -> pd.DataFrame:
    """The top-k helpful (largest score) and harmful (smallest score) per test."""
    k = min(k, scores.shape[1])
    rows = []
    for i, test_id in enumerate(test_ids):
        order = np.argsort(scores[i], kind="stable")
        for kind, ids in (("helpful", order[::-1][:k]), ("harmful", order[:k])):
            for rank, pretrain_id in enumerate(ids, start=1):
                rows.append((scenario, int(test_id), kind, rank, int(pretrain_id)))
    frame = pd.DataFrame(rows, columns=["scenario", "test_id", "kind", "rank", "pretrain_id"])
    index = {int(t): i for i, t in enumerate(test_ids)}
    frame["score"] = scores[frame["test_id"].map(index), frame["pretrain_id"]]
    return frame


def write_synthetic_run(
    out: Path,
    n_pretrain: int,
    n_test: int,
    *,
    scenarios: tuple[str, ...] = ("fixed", "updated"),
    top_k: int = 10,
    full_scores: bool = True,
    images: bool = True,
    seed: int = 0,
    image_size: int = 8,
    validation: bool = True,
    class_names: tuple[str, ...] | None = None,
    manifest: dict | None = None,
) -> Path:
    """Write a complete synthetic run to `out` with RunWriter and return its path.

    images=True: 10 digit classes, `image_size`x`image_size` grayscale PNGs, text null.
    images=False: 4 topics of text rows (some with HTML/markdown), image_png null.
    full_scores=False leaves out scores.parquet (the explorer then falls back to top.parquet).
    class_names replaces the label names (10 for images, 4 for text); `manifest` entries are
    added to (or replace) the written manifest's, e.g. {"unconverged_tests": {...}}.
    """
    rng = np.random.default_rng(seed)
    n_classes = 10 if images else len(_TOPICS)
    angles = np.linspace(0, 2 * np.pi, n_classes, endpoint=False)
    centres = np.stack([6 * np.cos(angles), 6 * np.sin(angles)], axis=1)

    names = tuple(class_names or (CLASS_NAMES if images else _TOPICS))
    if len(names) != n_classes:
        raise ValueError(f"class_names needs {n_classes} names, got {len(names)}")
    pretrain = _examples(n_pretrain, n_classes, centres, images, image_size, rng, names)
    pretrain.insert(0, "pretrain_id", np.arange(n_pretrain, dtype=np.int64))
    test = _examples(n_test, n_classes, centres, images, image_size, rng, names)
    test.insert(0, "test_id", np.arange(n_test, dtype=np.int64))
    if images:
        confused = np.array([_CONFUSED[c] for c in range(n_classes)])
    else:
        confused = (np.arange(n_classes) + 1) % n_classes

    predictions, tops = [], []
    scale = np.exp(rng.normal(scale=0.8, size=n_pretrain))  # some examples matter more
    test_ids = test["test_id"].to_numpy()
    test_labels = test["label"].to_numpy()
    pretrain_labels = pretrain["label"].to_numpy()
    tests_per_group = max(1, 2**20 // max(n_pretrain, 1))

    with RunWriter(Path(out), overwrite=True) as run:
        writer = run.scores_writer() if full_scores else None
        for s_index, scenario in enumerate(sorted(scenarios)):
            wrong = rng.random(n_test) < 0.15 + 0.05 * s_index
            pred = np.where(wrong, confused[test_labels], test_labels)
            confidence = np.where(
                wrong, rng.uniform(0.4, 0.8, n_test), rng.uniform(0.6, 1.0, n_test)
            )
            p_true = np.where(wrong, (1 - confidence) * 0.7, confidence)
            predictions.append(
                pd.DataFrame(
                    {
                        "scenario": scenario,
                        "test_id": test_ids,
                        "pred": pred.astype(np.int64),
                        "pred_name": [names[c] for c in pred],
                        "confidence": confidence.astype(np.float32),
                        "loss": (-np.log(p_true)).astype(np.float32),
                        "correct": ~wrong,
                    }
                )
            )
            scenario_rng = np.random.default_rng(seed + 1)  # scenarios share most of the signal
            for start in range(0, n_test, tests_per_group):
                ids = test_ids[start : start + tests_per_group]
                block = _scores(
                    test_labels[start : start + len(ids)],
                    pretrain_labels,
                    confused,
                    scale,
                    scenario_rng,
                )
                if s_index > 0:
                    block += rng.normal(scale=2e-4, size=block.shape).astype(np.float32)
                tops.append(_top(scenario, ids, block, top_k))
                if writer is not None:
                    table = pa.table(
                        {
                            "scenario": np.full(block.size, scenario, dtype=object),
                            "test_id": np.repeat(ids, n_pretrain),
                            "pretrain_id": np.tile(pretrain["pretrain_id"].to_numpy(), len(ids)),
                            "score": block.ravel(),
                        },
                        schema=TABLE_SCHEMAS["scores"],
                    )
                    writer.write_table(table, row_group_size=block.size)
        if writer is not None:
            writer.close()

        top = pd.concat(tops, ignore_index=True)
        # row groups as the engine writes them (precompute.tables.DESCRIBE_CHUNK), so the
        # explorer reads a few examples' text without decoding the whole column
        run.write_table("pretrain", pretrain, row_group_size=PRETRAIN_ROWS_PER_GROUP)
        run.write_table("test", test)
        run.write_table("predictions", pd.concat(predictions, ignore_index=True))
        run.write_table("top", top)
        if validation:
            sample = top[top["rank"] <= 3].head(60)
            noise = rng.normal(scale=0.15, size=len(sample))
            run.write_table(
                "validation",
                pd.DataFrame(
                    {
                        "scenario": sample["scenario"],
                        "test_id": sample["test_id"],
                        "pretrain_id": sample["pretrain_id"],
                        "predicted": sample["score"].astype(float),
                        "actual": sample["score"].astype(float) * (1 + noise),
                    }
                ),
            )
        return run.finish(
            {
                "task": "synthetic-digits" if images else "synthetic-text",
                "scenarios": sorted(scenarios),
                "solver": "synthetic",
                "damping": 0.001,
                "proximal_alpha": 1.0,
                "counts": {"pretrain": n_pretrain, "finetune_train": n_test * 2, "test": n_test},
                "top_k": top_k,
                "full_scores": bool(full_scores),
                "device": "cpu",
                "timings_s": {"pretrain_pass": 0.0, "test_side": 0.0, "umap": 0.0},
                "versions": {"msif": "synthetic"},
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **(manifest or {}),
            }
        )
