"""precompute.hf: Hugging Face models as msif tasks (tiny BERT and GPT-2 built from configs).

Fast tests use the untrained models: losses against transformers' own, masks, per-example
gradients under vmap, shared names, error sentences. The slow ones train the tiny tasks and run
them through `precompute` in both scenarios, with fused (sdpa) and eager attention.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_tasks import TinyBertTask, TinyGPT2Task, eager, gradient_norm_of

from precompute.hf import (
    IGNORE,
    TensorExamples,
    causal_lm_losses,
    detect_kind,
    masked_lm_losses,
    model_inputs,
    shared_names,
)
from precompute.objective import ParamSpace, batch_grads, functional_loss
from precompute.pipeline import PrecomputeConfig, precompute
from precompute.rundir import read_manifest, read_table
from precompute.task import TaskError, load_task

FAMILIES = {"bert": TinyBertTask, "gpt2": TinyGPT2Task}


def untrained(task_class, attn="sdpa"):
    """(task, pretrained model, finetuned model) with the models at their random init."""
    task = task_class()
    pre = task.new_pretrain_model(attn).double().eval()
    fine = task.new_finetune_model(attn).double().eval()
    return task, pre, fine


def first(dataset, count=8):
    return torch.utils.data.default_collate([dataset[i] for i in range(count)])


# ------------------------------------------------------------------------------- conventions
def test_transformers_picks_sdpa_by_default():
    """A model built from a config that names no attention implementation uses "sdpa" (torch's
    fused scaled_dot_product_attention), what the precompute-time models use."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    small = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    bert = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, **small))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2))
    assert bert.config._attn_implementation == "sdpa"
    assert gpt2.config._attn_implementation == "sdpa"


def test_tensor_examples_keep_only_the_model_fields():
    examples = [
        {"input_ids": [3, 4, 0], "attention_mask": [1, 1, 0], "labels": 2, "text": "a b"},
        {"input_ids": [5, 0, 0], "attention_mask": [1, 0, 0], "labels": 0, "text": "c"},
    ]
    data = TensorExamples(examples, "x")
    batch = torch.utils.data.default_collate([data[0], data[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[3, 4, 0], [5, 0, 0]]
    assert batch["labels"].tolist() == [2, 0] and batch["labels"].dtype == torch.int64


@pytest.mark.parametrize(
    "examples, message",
    [
        ([], "x is empty"),
        ([[1, 2]], r"x\[0\] must be a dict with input_ids"),
        ([{"input_ids": [1, 2]}, {"input_ids": [1]}], "pad every example to one length"),
        ([{"input_ids": [1], "labels": 0}, {"input_ids": [2]}], r"x\[1\] has no 'labels'"),
        ([{"input_ids": [0.5]}], "must hold integers"),
    ],
)
def test_tensor_examples_refuse_bad_datasets(examples, message):
    with pytest.raises(TaskError, match=message):
        TensorExamples(examples, "x")


def test_pretraining_kinds_are_detected_from_the_model_class():
    assert detect_kind(untrained(TinyBertTask)[1]) == "masked_lm"
    assert detect_kind(untrained(TinyGPT2Task)[1]) == "causal_lm"
    assert detect_kind(untrained(TinyBertTask)[2]) == "model_loss"


# ---------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_per_example_pretraining_loss_is_transformers_loss_of_each_example(family):
    """g(z) equals the model's own mean loss computed on z alone, with padding present."""
    task, pre, _ = untrained(FAMILIES[family])
    batch = first(task.pretrain_data())
    assert (batch["attention_mask"] == 0).any()  # padding is exercised
    mine = task.pretrain_loss(pre, batch)
    assert mine.shape == (8,)
    for i in range(8):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        keep = one["attention_mask"].bool()[0]
        theirs = pre(
            input_ids=one["input_ids"][:, keep],
            labels=one["labels"][:, keep],
        ).loss
        # transformers computes its causal-LM loss in float32 whatever the model's dtype
        torch.testing.assert_close(mine[i], theirs.to(mine.dtype), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_the_gauss_newton_split_is_the_logits_and_their_cross_entropy(family):
    """pretrain_loss above is pretrain_loss_from_outputs(pretrain_outputs(...)); the split is
    taken from these hooks for both stages (loss_split checks it against the losses), and with
    `mlm_head` the masked LM's outputs are the head at the masked positions only."""
    from precompute.gauss_newton import loss_split

    task, pre, fine = untrained(FAMILIES[family])
    batch = first(task.pretrain_data())
    assert loss_split(task, "pretrain", pre, batch).source == "hooks"
    assert loss_split(task, "finetune", fine, first(task.finetune_train_data())).source == "hooks"
    length, vocab = batch["input_ids"].shape[1], pre.config.vocab_size
    positions = length if family == "bert" else length - 1  # causal: each predicts the next
    assert task.pretrain_outputs(pre, batch).shape == (8, positions, vocab)
    if family == "bert":  # with the head named, only at the (one) masked position
        task.mlm_head = "cls"
        assert task.pretrain_outputs(pre, batch).shape == (8, 1, vocab)
        assert loss_split(task, "pretrain", pre, batch).source == "hooks"


def test_masked_lm_head_at_the_masked_positions_gives_the_full_loss():
    task, pre, _ = untrained(TinyBertTask)
    batch = first(task.pretrain_data())
    full = task.pretrain_loss(pre, batch)
    task.mlm_head = "cls"
    torch.testing.assert_close(task.pretrain_loss(pre, batch), full, rtol=1e-12, atol=1e-12)


def test_loss_helpers_ignore_minus_100_and_shift_for_causal():
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[IGNORE, 3, IGNORE, 1], [IGNORE] * 4])
    logp = logits.log_softmax(-1)
    want = -(logp[0, 1, 3] + logp[0, 3, 1]) / 2
    got = masked_lm_losses(logits, labels)
    torch.testing.assert_close(got, torch.stack([want, want.new_zeros(())]))
    causal = causal_lm_losses(logits, torch.tensor([[2, 3, IGNORE, 1], [1, 1, 1, 1]]))
    torch.testing.assert_close(causal[0], -(logp[0, 0, 3] + logp[0, 2, 1]) / 2)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_finetuning_loss_is_per_example_cross_entropy_not_the_batch_mean(family):
    task, _, fine = untrained(FAMILIES[family])
    batch = first(task.finetune_train_data())
    losses = task.finetune_loss(fine, batch)
    assert losses.shape == (8,) and losses.std() > 0
    theirs = fine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    want = torch.nn.functional.cross_entropy(theirs.logits, batch["labels"], reduction="none")
    torch.testing.assert_close(losses, want, rtol=1e-10, atol=1e-12)
    assert task.finetune_logits(fine, batch).shape == (8, 3)
    assert task.represent(fine, batch).shape == (8, 16)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_4d_mask_gives_transformers_outputs(family, attn):
    """The additive mask built from attention_mask gives the logits of the 0/1 mask."""
    task, pre, _ = untrained(FAMILIES[family], attn)
    batch = first(task.pretrain_data())
    keep = batch["attention_mask"].bool()
    theirs = pre(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mine = pre(**model_inputs(pre, batch)).logits
    assert mine.shape == theirs.shape
    torch.testing.assert_close(mine[keep], theirs[keep], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_per_example_gradients_run_under_vmap(family):
    """msif's vmapped per-example gradients equal one backward per example (a 0/1 mask would
    make transformers branch on its values, which vmap refuses)."""
    task, pre, _ = untrained(FAMILIES[family])
    batch = first(task.pretrain_data(), 4)
    space = ParamSpace.of(pre, [n for n, _ in pre.named_parameters()])
    loss = functional_loss(pre, task.pretrain_loss, space)
    theta = space.read(pre)
    rows = batch_grads(loss, theta, batch)
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        want = torch.func.grad(lambda t, one=one: loss(t, one)[0])(theta)
        torch.testing.assert_close(rows[i], want, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- shared names
def test_shared_names_are_the_prefixed_parameters_of_both_models():
    task, pre, fine = untrained(TinyBertTask)
    names = shared_names("bert.", pre, {"fixed": fine})
    assert "bert.embeddings.word_embeddings.weight" in names
    assert not any("pooler" in n for n in names)  # only in the classifier: T
    assert all(n.startswith("bert.") for n in names)
    # the tied decoder weight is the word embedding, listed once; the head is U
    assert pre.cls.predictions.decoder.weight is pre.bert.embeddings.word_embeddings.weight
    assert "cls.predictions.decoder.weight" not in dict(pre.named_parameters())
    task2, pre2, fine2 = untrained(TinyGPT2Task)
    names2 = shared_names("transformer.", pre2, {"fixed": fine2})
    assert set(names2) == {n for n, _ in pre2.named_parameters()}  # U is empty: lm_head is tied


def test_shared_names_refuse_an_unknown_prefix_and_a_shape_mismatch():
    _, pre, fine = untrained(TinyBertTask)
    with pytest.raises(TaskError, match="no parameter of the pretrained model starts with"):
        shared_names("encoder.", pre, {"fixed": fine})
    with pytest.raises(TaskError, match="set shared_prefix"):
        shared_names("", pre, {"fixed": fine})
    from transformers import BertForSequenceClassification

    config = TinyBertTask().config("sdpa")
    config.vocab_size = 50
    with pytest.raises(TaskError, match=r"'bert.embeddings.word_embeddings.weight' has shape"):
        shared_names("bert.", pre, {"updated": BertForSequenceClassification(config)})


def test_describe_gives_the_text_and_the_class_name(monkeypatch):
    task = TinyBertTask()
    # class names from the finetuned model's config.id2label (an untrained model here)
    monkeypatch.setattr(task, "finetuned_model", lambda scenario: untrained(TinyBertTask)[2])
    row = task.describe("test", 0)
    example = task.finetune_test_examples()[0]
    assert row["text"] == example["text"] and row["label"] == example["labels"]
    assert row["label_name"] == f"LABEL_{row['label']}"  # transformers' default id2label
    task.class_names = ["alpha", "beta", "gamma"]
    assert task.describe("test", 0)["label_name"] == task.class_names[row["label"]]
    pre = task.describe("pretrain", 3)
    assert pre["label"] is None and pre["text"] == task.pretrain_examples()[3]["text"]


def test_a_task_without_its_examples_is_named_by_load_task(tmp_path):
    source = (
        "from precompute.hf import HFTask\n"
        "class Half(HFTask):\n"
        "    shared_prefix = 'bert.'\n"
        "    def pretrained_model(self): ...\n"
        "    def finetuned_model(self, scenario): ...\n"
    )
    (tmp_path / "half.py").write_text(source)
    with pytest.raises(TaskError, match="does not implement .*pretrain_examples"):
        load_task(f"{tmp_path / 'half.py'}:Half")


# ------------------------------------------------------------------- end to end (trained)
# the tiny models are trained as real ones are, near but not at an optimum, where the Hessian is
# indefinite: the Gauss-Newton curvature (PSD) is the one that solves
CONFIG = dict(
    solver="cg", curvature="ggn", cg_tol=1e-5, cg_max_iter=1000, full_scores="on", maps=False,
    device="cpu", top_k=5,
)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(family, attention): run dir} of the trained tiny tasks, the same weights for both
    attention implementations."""
    root = tmp_path_factory.mktemp("hf_runs")
    out = {}
    for family, task_class in FAMILIES.items():
        for attn, cls in (("sdpa", task_class), ("eager", eager(task_class))):
            config = PrecomputeConfig(**CONFIG)
            out[family, attn] = precompute(cls(), root / f"{family}-{attn}", config, log=print)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_hf_tasks_run_end_to_end_in_both_scenarios(runs, family):
    task = FAMILIES[family]()
    assert gradient_norm_of(task, "fixed") < 1e-6  # a convex problem, solved
    run = runs[family, "sdpa"]
    manifest = read_manifest(run)
    assert manifest["complete"] and manifest["scenarios"] == ["fixed", "updated"]
    assert manifest["counts"] == {"pretrain": 96, "finetune_train": 30, "test": 6}
    assert manifest["unconverged_tests"] == {}  # every cg solve converged
    for system in ("pretrain", "fixed", "updated"):
        assert manifest["solver"][system]["curvature"] == "ggn"
    u = manifest["parameters"]["pretrain_only"]
    assert (u > 0) if family == "bert" else (u == 0)  # GPT-2's lm_head is tied to wte
    scores = read_table(run, "scores")
    assert len(scores) == 2 * 6 * 96 and np.isfinite(scores["score"]).all()
    assert (scores["score"] != 0).mean() > 0.9
    # not a collapsed model: the finetuned predictions differ between tests
    tests = task.finetune_test_data().batch(0, 6)
    logits = task.finetune_logits(task.finetuned_model("fixed"), tests)
    assert logits.std(0).min() > 0.1
    assert read_table(run, "pretrain")["text"].notna().all()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_fused_attention_scores_equal_eager_attention_scores(runs, family):
    fused = read_table(runs[family, "sdpa"], "scores")
    plain = read_table(runs[family, "eager"], "scores")
    assert set(fused["scenario"]) == {"fixed", "updated"}
    keys = ["scenario", "test_id", "pretrain_id"]
    assert fused[keys].equals(plain[keys])
    scale = np.abs(plain["score"]).max()
    difference = np.abs(fused["score"].to_numpy() - plain["score"].to_numpy()).max()
    print(f"{family}: max |sdpa - eager| / max |score| = {difference / scale:.2e}")
    # the two runs differ by float64 rounding in attention; each CG stops at a relative residual
    # of 1e-5, so their solutions may differ by up to that times the system's conditioning
    assert scale > 0 and difference <= 1e-3 * scale
