"""Tiny `HFTask`s for tests: a 1-layer BERT (masked LM -> sequence classification) and a 1-layer
GPT-2 (causal LM -> sequence classification), built from configs (nothing downloaded), float64.

Data: token sequences about one of 3 topics (each topic draws most of its words from its own 10
of the 30 words), 3 to 7 words long, right-padded to 8 positions. Pretraining: 96 sequences
(BERT: [CLS] first and one word replaced by [MASK], the label there; GPT-2: next-token
prediction). Finetuning: the topic, 30 training and 6 test sequences.

Models are trained once per process (eager attention) as real ones are, with a budget: the
finetuning problems to their optimum, the pretraining one near it (L2 0.01: a stronger L2 collapses
the network to a constant, where every score is zero; a weaker one leaves the Gauss-Newton system
too ill-conditioned for a quick CG). They are handed out with the attention implementation a task
names, so an sdpa task and an eager task share the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from precompute.hf import IGNORE, HFTask, copy_shared, shared_names
from precompute.tasks.training import grad_norm, lbfgs_newton

PAD, CLS, MASK, FIRST_WORD = 0, 1, 2, 3
WORDS, TOPICS, LENGTH = 30, 3, 8
VOCAB = FIRST_WORD + WORDS
# LayerNorm makes the weights before it scale-invariant; with an L2 term the objective then has
# no well-conditioned optimum unless eps is comparable to the variance it normalises
LAYER_NORM_EPS = 0.1
_TRAINED: dict[tuple, dict] = {}  # (task class, model) -> state dict, shared by sdpa and eager


def sequences(count: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """`count` (word ids, topic) pairs: 3-7 words, each from the topic's block with prob 0.8."""
    g = torch.Generator().manual_seed(seed)
    rows, topics = [], []
    for _ in range(count):
        topic = int(torch.randint(TOPICS, (), generator=g))
        size = int(torch.randint(3, LENGTH, (), generator=g))
        own = torch.rand(size, generator=g) < 0.8
        block = WORDS // TOPICS
        mine = FIRST_WORD + topic * block + torch.randint(block, (size,), generator=g)
        any_word = FIRST_WORD + torch.randint(WORDS, (size,), generator=g)
        rows.append(torch.where(own, mine, any_word).tolist())
        topics.append(topic)
    return rows, topics


def padded(ids: list[int]) -> tuple[list[int], list[int]]:
    ids = ids[:LENGTH]
    return ids + [PAD] * (LENGTH - len(ids)), [1] * len(ids) + [0] * (LENGTH - len(ids))


def minimise(objective, params: list[torch.Tensor], tol: float = 1e-9) -> float:
    """training.lbfgs_newton: full-batch L-BFGS, Newton-CG from |grad| < 1e-3 (again after more
    L-BFGS where it stops short); the gradient norm reached."""
    return lbfgs_newton(
        objective, params, tol, newton_from=1e-3, chunk=200, max_iter=1000, history=50
    )["grad_norm"]


class TinyHFTask(HFTask):
    """Base of the two tiny tasks: examples, training, caching of the trained weights."""

    scenarios = ("fixed", "updated")
    pretrain_l2 = 1e-2
    finetune_l2 = 1e-3
    proximal_alpha = 0.5
    attn_implementation = "sdpa"  # what the handed-out models use
    m, n, q = 96, 30, 6
    grad_norms: dict[str, float] = {}

    # -------------------------------------------------------------- for a model family to set
    def new_pretrain_model(self, attn: str) -> nn.Module:
        raise NotImplementedError

    def new_finetune_model(self, attn: str) -> nn.Module:
        raise NotImplementedError

    def pretrain_example(self, words: list[int], index: int) -> dict:
        raise NotImplementedError

    # ----------------------------------------------------------------------------- examples
    def pretrain_examples(self) -> list[dict]:
        rows, _ = sequences(self.m, seed=0)
        return [self.pretrain_example(r, i) for i, r in enumerate(rows)]

    def _classify(self, count: int, seed: int) -> list[dict]:
        rows, topics = sequences(count, seed)
        out = []
        for r, topic in zip(rows, topics, strict=True):
            ids, mask = padded(self.prefix_tokens + r)
            out.append({"input_ids": ids, "attention_mask": mask, "labels": topic, "text": str(r)})
        return out

    def finetune_train_examples(self) -> list[dict]:
        return self._classify(self.n, seed=1)

    def finetune_test_examples(self) -> list[dict]:
        return self._classify(self.q, seed=2)

    prefix_tokens: list[int] = []

    # ------------------------------------------------------------------------------ models
    def _state(self, which: str) -> dict:
        key = (self.family, which)
        if key not in _TRAINED:
            _TRAINED[key] = self._train(which)
        return _TRAINED[key]

    def _train(self, which: str) -> dict:
        if which == "pretrained":
            model = self.new_pretrain_model("eager").double().eval()
            params = list(model.parameters())
            norm = minimise(lambda: self.pretrain_objective(model), params)
        else:
            pretrained = self.new_pretrain_model("eager").double().eval()
            pretrained.load_state_dict(self._state("pretrained"))
            model = self.new_finetune_model("eager").double().eval()
            w = shared_names(self.shared_prefix, pretrained, {which: model})
            copy_shared(pretrained, model, w)
            anchor = {n: p.detach().clone() for n, p in pretrained.named_parameters() if n in w}
            for n, p in model.named_parameters():
                p.requires_grad_(which == "updated" or n not in anchor)
            params = [p for p in model.parameters() if p.requires_grad]
            norm = minimise(lambda: self.finetune_objective(model, which, anchor), params)
            for p in model.parameters():
                p.requires_grad_(True)
        type(self).grad_norms[f"{self.family}/{which}"] = norm
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def pretrained_model(self) -> nn.Module:
        model = self.new_pretrain_model(self.attn_implementation).double().eval()
        model.load_state_dict(self._state("pretrained"))
        return model

    def finetuned_model(self, scenario: str) -> nn.Module:
        model = self.new_finetune_model(self.attn_implementation).double().eval()
        model.load_state_dict(self._state(scenario))
        return model


class TinyBertTask(TinyHFTask):
    """BertForMaskedLM -> BertForSequenceClassification; W = bert.* (the tied decoder weight is
    the word embedding), U = the masked-LM head, T = the pooler and the classifier."""

    name = "tiny-bert"
    family = "bert"
    shared_prefix = "bert."
    prefix_tokens = [CLS]

    def config(self, attn: str):
        from transformers import BertConfig

        return BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=LENGTH,
            type_vocab_size=1,
            layer_norm_eps=LAYER_NORM_EPS,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=PAD,
            num_labels=TOPICS,
            attn_implementation=attn,
        )

    def new_pretrain_model(self, attn: str) -> nn.Module:
        from transformers import BertForMaskedLM

        torch.manual_seed(0)
        return BertForMaskedLM(self.config(attn))

    def new_finetune_model(self, attn: str) -> nn.Module:
        from transformers import BertForSequenceClassification

        torch.manual_seed(1)
        return BertForSequenceClassification(self.config(attn))

    def pretrain_example(self, words: list[int], index: int) -> dict:
        ids, mask = padded([CLS] + words)
        k = 1 + index % len(words)  # the masked position, after [CLS]
        labels = [IGNORE] * LENGTH
        labels[k], ids[k] = ids[k], MASK
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "text": str(words)}


class TinyGPT2Task(TinyHFTask):
    """GPT2LMHeadModel -> GPT2ForSequenceClassification; W = transformer.* (lm_head.weight is
    tied to transformer.wte.weight, so U is empty), T = the score head."""

    name = "tiny-gpt2"
    family = "gpt2"
    shared_prefix = "transformer."
    pooling = "last"

    def config(self, attn: str):
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_inner=32,
            n_positions=LENGTH,
            layer_norm_epsilon=LAYER_NORM_EPS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=PAD,
            bos_token_id=CLS,
            eos_token_id=CLS,
            num_labels=TOPICS,
            attn_implementation=attn,
        )

    def new_pretrain_model(self, attn: str) -> nn.Module:
        from transformers import GPT2LMHeadModel

        torch.manual_seed(0)
        return GPT2LMHeadModel(self.config(attn))

    def new_finetune_model(self, attn: str) -> nn.Module:
        from transformers import GPT2ForSequenceClassification

        torch.manual_seed(1)
        return GPT2ForSequenceClassification(self.config(attn))

    def pretrain_example(self, words: list[int], index: int) -> dict:
        ids, mask = padded(words)
        labels = [i if a else IGNORE for i, a in zip(ids, mask, strict=True)]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "text": str(words)}


def eager(task_class: type[TinyHFTask]) -> type[TinyHFTask]:
    """The same task (same trained weights) handing out eager-attention models."""
    return type(f"Eager{task_class.__name__}", (task_class,), {"attn_implementation": "eager"})


def gradient_norm_of(task: TinyHFTask, which: str) -> float:
    """|grad| of the objective that `which` ("pretrained", "fixed", "updated") minimised."""
    if which == "pretrained":
        model = task.pretrained_model()
        return grad_norm(lambda: task.pretrain_objective(model), list(model.parameters()))
    pretrained = task.pretrained_model()
    model = task.finetuned_model(which)
    w = shared_names(task.shared_prefix, pretrained, {which: model})
    anchor = {n: p.detach() for n, p in pretrained.named_parameters() if n in w}
    params = [p for n, p in model.named_parameters() if which == "updated" or n not in anchor]
    return grad_norm(lambda: task.finetune_objective(model, which, anchor), params)
