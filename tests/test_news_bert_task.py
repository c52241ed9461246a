"""The built-in news-bert task: data and masking (deterministic, one masked word per sentence),
shapes, describe marking the masked word; a slow end-to-end run from a fresh cache."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from precompute.hf import IGNORE
from precompute.task import load_task
from precompute.tasks.news import NewsTask
from precompute.tasks.news_bert import CLS, MASK, PAD, NewsBertTask, mark, words_with_spans


@pytest.fixture(scope="module")
def task():
    task = NewsBertTask()
    task.stats()  # reads the data (no model trained)
    return task


def test_loads_by_module_path():
    assert isinstance(load_task("precompute.tasks.news_bert:NewsBertTask"), NewsBertTask)


def test_words_and_mark_keep_the_original_text():
    text = "Shares in Vodafone rose; it's the firm's best day."
    words = words_with_spans(text)
    assert [w for w, _, _ in words] == ["shares", "vodafone", "rose", "firm's", "best", "day"]
    _, start, end = words[1]
    assert mark(text, start, end) == "Shares in [[Vodafone]] rose; it's the firm's best day."


def test_data_and_masks_are_deterministic(task):
    again = NewsBertTask()
    for split in ("pretrain", "finetune_train", "test"):
        a, b = task.tensors(split).tensors, again.tensors(split).tensors
        assert a.keys() == b.keys()
        for field in a:
            assert torch.equal(a[field], b[field]), (split, field)
    assert task.vocabulary == again.vocabulary


def test_one_masked_word_per_sentence(task):
    data = task.pretrain_data().tensors
    ids, mask, labels = data["input_ids"], data["attention_mask"], data["labels"]
    m = len(ids)
    assert 0.25 * task.n_sentences <= m <= task.n_sentences  # 994 of 3,000 by default
    assert ids.shape == labels.shape == mask.shape == (m, task.max_words + 1)
    masked = labels != IGNORE
    assert masked.sum(1).eq(1).all()  # exactly one loss per example
    assert ids[masked].eq(MASK).all() and ids.eq(MASK).sum(1).eq(1).all()
    assert ids[:, 0].eq(CLS).all()
    assert (labels[masked] > MASK).all() and (labels[masked] <= MASK + task.n_targets).all()
    words = mask.sum(1) - 1
    assert (words >= task.min_words).all() and (words <= task.max_words).all()
    assert ids[mask == 0].eq(PAD).all()
    # the mask position is drawn among the words, not always the same one
    assert len(set(masked.int().argmax(1).tolist())) >= task.min_words


def test_describe_marks_the_masked_word(task):
    news = NewsTask()
    vocab = task.vocabulary
    labels = task.pretrain_data().tensors["labels"]
    for i in range(len(labels)):
        row = task.describe("pretrain", i)
        assert row["label"] is None and row["image"] is None
        text = row["text"]
        assert text.count("[[") == 1 and text.count("]]") == 1, text
        word = text[text.index("[[") + 2 : text.index("]]")]
        assert word.lower() == vocab[int(labels[i][labels[i] != IGNORE])]
        # the sentence as written in the news task (some with brackets of their own: "[the
        # figures] show"), only the double brackets added
        passage = task.pretrain_examples()[i]["passage"]
        original = news.describe("pretrain", passage)["text"]
        assert text.replace("[[", "", 1).replace("]]", "", 1) == original


def test_finetuning_uses_the_news_split(task):
    news = NewsTask()
    fine, test = task.finetune_train_data(), task.finetune_test_data()
    assert len(fine) == len(news.article_indices("finetune_train")) == 300
    assert len(test) == len(news.article_indices("test")) == 100
    assert fine.tensors["input_ids"].shape == (300, task.article_words + 1)
    labels = test.tensors["labels"]
    articles = news.articles()
    want = [articles[int(a)][0] for a in news.article_indices("test")]
    assert labels.tolist() == want
    row = task.describe("test", 5)
    assert row["label_name"] == news.finetune_class_names[row["label"]]
    assert row["text"] == articles[int(news.article_indices("test")[5])][2]


def test_models_and_parameter_groups(task):
    pre, _fine = task.new_pretrain_model(), task.new_finetune_model()
    assert pre.config._attn_implementation == "sdpa"  # the default, used at precompute time
    assert next(pre.parameters()).dtype == torch.float64
    batch = torch.utils.data.default_collate([task.pretrain_data()[i] for i in range(4)])
    assert task.pretrain_loss(pre, batch).shape == (4,)
    stats = task.stats()
    h = task.hidden
    assert stats["T"] == h * h + h + 5 * (h + 1)  # the pooler and the 5-topic classifier
    assert stats["U"] == len(task.vocabulary)  # the head's bias (its dense, LayerNorm frozen)


# --------------------------------------------------------------------------------- slow tests
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`msif precompute --task news-bert` from a fresh cache (training included), no map."""
    from precompute.cli import main

    root = tmp_path_factory.mktemp("news-bert")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MSIF_CACHE", str(root / "cache"))
        assert (
            main(["precompute", "--task", "news-bert", "--out", str(root / "run"), "--no-maps"])
            == 0
        )
        task = NewsBertTask()
        task.pretrained_model(), task.finetuned_model("fixed"), task.finetuned_model("updated")
    return task, root / "run"


@pytest.mark.slow
def test_run_trains_to_the_optimum_with_positive_definite_hessians(run):
    task, out = run
    for name in ("pretrained", "finetuned-fixed", "finetuned-updated"):
        assert task.fit_info[name]["cached"] is True  # trained by the run, read back here
        assert task.fit_info[name]["grad_norm"] <= task.grad_tol, name
    manifest = json.loads((out / "manifest.json").read_text())
    for stage in ("pretrain", "fixed", "updated"):
        solver = manifest["solver"][stage]
        assert solver["curvature"] == "hessian"
        assert solver["negative_eigenvalues"] == 0 and solver["min_eigenvalue"] > 0, stage
    # every layer but the position lookup (shared by the batch) by its rule; no fallback
    scoring = manifest["pretraining_pass"]
    assert scoring["path"] == "layers"
    assert "bert.embeddings.position_embeddings.weight" in scoring["vmap_params"]
    assert "bert.embeddings.word_embeddings.weight" not in scoring["vmap_params"]


@pytest.mark.slow
def test_run_scores_are_not_degenerate_and_describe_the_masked_word(run):
    _task, out = run
    top = pd.read_parquet(out / "top.parquet")
    first = top[top["rank"] == 1]
    for scenario in ("fixed", "updated"):
        part = first[first["scenario"] == scenario]
        helpful, harmful = part[part["kind"] == "helpful"], part[part["kind"] == "harmful"]
        assert (helpful["score"] > 0).mean() > 0.9 and (harmful["score"] < 0).mean() > 0.9
        # different tests are explained by different examples
        assert helpful["pretrain_id"].nunique() >= 10
    fixed, updated = (
        first[first["scenario"] == s].set_index(["test_id", "kind"])["score"]
        for s in ("fixed", "updated")
    )
    assert not np.allclose(fixed.sort_index(), updated.sort_index())
    texts = pd.read_parquet(out / "pretrain.parquet")["text"]
    assert texts.str.count(r"\[\[").eq(1).all() and texts.str.count(r"\]\]").eq(1).all()
