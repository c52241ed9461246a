"""The built-in `news-bert` task: a small BERT pretrained by masked-language modelling on BBC News
sentences, finetuned to classify news articles by topic (both scenarios).

The `news` task's setting with a transformer instead of mean word embeddings, built on `HFTask`
(precompute.hf) and `transformers` models made from a `BertConfig`; nothing is downloaded.

Data (from the `news` task, precompute.tasks.news: its articles, split and pretraining
sentences):
- pretraining: `n_sentences` of the `news` pretraining sentences drawn with `sample_seed`.
  Words: case-insensitive matches of news.TOKEN_RE, lowercased, minus news.STOP_WORDS. The
  vocabulary is built from these sentences: [PAD], [CLS], [MASK], then every word seen at least
  `min_count` times, most frequent first (at most `max_vocab` words); other words are left out.
  A sentence's input is [CLS] and its first `max_words` vocabulary words; sentences with fewer
  than `min_words` are dropped. ONE of its words, drawn with `mask_seed`, is replaced by [MASK]
  and is the label at that position (-100 elsewhere), so each example has one loss:
      g(z; W, U) = -log softmax(head(h_mask))[masked word],
  h_mask the encoder's last hidden state at the [MASK] position; head = the BERT masked-LM head
  (`cls.*`: dense, LayerNorm, and the decoder tied to the word embeddings, plus a bias).
- finetuning: the `news` split's 300 training and 100 test articles, each as [CLS] and its
  first `article_words` vocabulary words; f(x; W, T) = cross-entropy of the topic (5 classes)
  from BertForSequenceClassification's [CLS] pooler and classifier.
W = `bert.*` (embeddings and encoder), U = `cls.predictions.*` (minus the tied decoder weight,
which is W's word embedding), T = `bert.pooler.*` and `classifier.*`.

Objectives (DESIGN.md section 2, `HFTask.pretrain_objective` / `finetune_objective`), float64,
minimised full-batch by L-BFGS and then Newton-CG (exact Hessian-vector products, under
precompute.objective.second_order) to gradient 2-norms below `grad_tol`. Training runs with eager
attention (no fused kernel in the double backward); the models handed out use the default (sdpa).
Checkpoints are cached under $MSIF_CACHE like the other built-in tasks (precompute.tasks.base).
"""

from __future__ import annotations

import collections
import re
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from precompute.hf import IGNORE, HFTask, copy_shared, shared_names
from precompute.objective import second_order
from precompute.tasks.base import BuiltinTask
from precompute.tasks.news import STOP_WORDS, TOKEN_RE, NewsTask
from precompute.tasks.training import grad_norm, newton_cg, warn_if_unconverged

DTYPE = torch.float64
SPECIAL = ("[PAD]", "[CLS]", "[MASK]")  # ids 0, 1, 2
PAD, CLS, MASK = 0, 1, 2
WORD_RE = re.compile(TOKEN_RE.pattern, re.IGNORECASE)  # news.tokenize's words, on original case


def words_with_spans(text: str) -> list[tuple[str, int, int]]:
    """(lowercase word, start, end) of each word of `text` outside news.STOP_WORDS."""
    found = ((m.group().lower(), m.start(), m.end()) for m in WORD_RE.finditer(text))
    return [w for w in found if w[0] not in STOP_WORDS]


def mark(text: str, start: int, end: int) -> str:
    """`text` with text[start:end] in square brackets: "shares in [vodafone] fell"."""
    return f"{text[:start]}[{text[start:end]}]{text[end:]}"


def build_vocabulary(sentences: list[str], min_count: int, max_words: int) -> list[str]:
    """SPECIAL, then the words seen at least `min_count` times, by count then alphabet."""
    counts = collections.Counter(w for s in sentences for w, _, _ in words_with_spans(s))
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return list(SPECIAL) + ranked[:max_words]


def encode(ids: list[int], length: int) -> tuple[list[int], list[int]]:
    """([CLS] + ids, cut and padded with [PAD] to `length`; the 0/1 attention mask)."""
    tokens = ([CLS] + ids)[:length]
    pad = length - len(tokens)
    return tokens + [PAD] * pad, [1] * len(tokens) + [0] * pad


class NewsBertTask(HFTask, BuiltinTask):
    """Pretrain a 2-layer BERT by masked-word prediction on BBC News sentences, finetune it to
    classify the topic of news articles (FIXED and UPDATED). See the module docstring."""

    name = "news-bert"
    scenarios = ("fixed", "updated")
    shared_prefix = "bert."
    pretrain_kind = "masked_lm"
    mlm_head = "cls"  # the head runs at the [MASK] position only (the same loss)
    pooling = "first"  # the [CLS] hidden state, what the classifier's pooler reads
    pretrain_l2 = 1e-3
    finetune_l2 = 1e-3
    proximal_alpha = 0.1

    # data
    n_sentences = 2000
    sample_seed = 0
    mask_seed = 1
    min_count = 2
    max_vocab = 4000
    min_words = 4
    max_words = 12
    article_words = 16
    # model
    hidden = 32
    layers = 2
    heads = 2
    intermediate = 64
    init_seed = 0
    layer_norm_eps = 0.1  # not BERT's 1e-12: see the module docstring
    # training
    grad_tol = 1e-8
    lbfgs_chunk = 50
    lbfgs_max_iter = 3000
    newton_steps = 6
    version = "1"
    cache_fields = (
        *BuiltinTask.cache_fields,
        *(
            "n_sentences sample_seed mask_seed min_count max_vocab min_words max_words "
            "article_words hidden layers heads intermediate init_seed grad_tol"
        ).split(),
    )

    def __init__(self) -> None:
        super().__init__()
        self._news = NewsTask()
        self._prepared: dict | None = None

    # ----------------------------------------------------------------------------------- data
    def _data(self) -> dict:
        if self._prepared is None:
            self._prepared = self._prepare()
        return self._prepared

    def _prepare(self) -> dict:
        """Sentences, vocabulary, masked positions and the examples of the three splits."""
        start = time.perf_counter()
        news = self._news
        count = len(news.pretrain_data())
        order = np.random.default_rng(self.sample_seed).permutation(count)[: self.n_sentences]
        passages = [int(i) for i in np.sort(order)]
        texts = [news.describe("pretrain", i)["text"] for i in passages]
        vocab = build_vocabulary(texts, self.min_count, self.max_vocab)
        index = {w: i for i, w in enumerate(vocab)}
        draws = np.random.default_rng(self.mask_seed).random(len(texts))
        length = self.max_words + 1
        pretrain = []
        for passage, text, draw in zip(passages, texts, draws, strict=True):
            kept = [w for w in words_with_spans(text) if w[0] in index][: self.max_words]
            if len(kept) < self.min_words:
                continue
            k = int(draw * len(kept))  # the masked word
            word, begin, end = kept[k]
            ids, attention = encode([index[w] for w, _, _ in kept], length)
            labels = [IGNORE] * length
            labels[k + 1] = ids[k + 1]  # + 1: after [CLS]
            ids[k + 1] = MASK
            pretrain.append(
                {
                    "input_ids": ids,
                    "attention_mask": attention,
                    "labels": labels,
                    "text": mark(text, begin, end),
                    "masked_word": word,
                    "passage": passage,  # its index among the news task's sentences
                }
            )
        articles = news.articles()

        def article_examples(split: str) -> list[dict]:
            rows = []
            for a in news.article_indices(split):
                topic, _, text = articles[int(a)]
                words = [index[w] for w, _, _ in words_with_spans(text) if w in index]
                ids, attention = encode(words, self.article_words + 1)
                rows.append(
                    {"input_ids": ids, "attention_mask": attention, "labels": topic, "text": text}
                )
            return rows

        return {
            "vocab": vocab,
            "pretrain": pretrain,
            "finetune_train": article_examples("finetune_train"),
            "test": article_examples("test"),
            "seconds": time.perf_counter() - start,
        }

    def pretrain_examples(self) -> list[dict]:
        return self._data()["pretrain"]

    def finetune_train_examples(self) -> list[dict]:
        return self._data()["finetune_train"]

    def finetune_test_examples(self) -> list[dict]:
        return self._data()["test"]

    @property
    def vocabulary(self) -> list[str]:
        """The words by token id (0-2: [PAD], [CLS], [MASK])."""
        return list(self._data()["vocab"])

    @property
    def class_names(self) -> dict[int, str]:
        return self._news.finetune_class_names

    finetune_class_names = class_names

    def stats(self) -> dict:
        """Sizes of the data and of W, U, T."""
        data = self._data()
        pre, fine = self.new_pretrain_model(), self.new_finetune_model()
        w = shared_names(self.shared_prefix, pre, {"fixed": fine}, self.name)
        sizes = {n: p.numel() for n, p in pre.named_parameters()}
        t = sum(p.numel() for n, p in fine.named_parameters() if n not in w)
        return {
            "pretrain": len(data["pretrain"]),
            "finetune_train": len(data["finetune_train"]),
            "test": len(data["test"]),
            "vocab": len(data["vocab"]),
            "W": sum(sizes[n] for n in w),
            "U": sum(s for n, s in sizes.items() if n not in w),
            "T": t,
            "prepare_seconds": data["seconds"],
        }

    # ---------------------------------------------------------------------------------- models
    def config(self, attn_implementation: str = "sdpa", **extra: Any):
        """The BertConfig of both models (no dropout: the objectives are deterministic)."""
        from transformers import BertConfig

        return BertConfig(
            vocab_size=len(self._data()["vocab"]),
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=max(self.max_words, self.article_words) + 1,
            type_vocab_size=1,
            layer_norm_eps=self.layer_norm_eps,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=PAD,
            attn_implementation=attn_implementation,
            **extra,
        )

    def new_pretrain_model(self, attn_implementation: str = "sdpa") -> nn.Module:
        from transformers import BertForMaskedLM

        torch.manual_seed(self.init_seed)  # transformers initialises from the global generator
        return BertForMaskedLM(self.config(attn_implementation)).to(DTYPE)

    def new_finetune_model(self, attn_implementation: str = "sdpa") -> nn.Module:
        from transformers import BertForSequenceClassification

        names = self.class_names
        config = self.config(
            attn_implementation,
            num_labels=len(names),
            id2label=dict(names),
            label2id={v: k for k, v in names.items()},
        )
        torch.manual_seed(self.init_seed + 1)
        return BertForSequenceClassification(config).to(DTYPE)

    # -------------------------------------------------------------------------------- training
    def _minimise(self, objective, params: list[torch.Tensor], what: str) -> dict:
        """Minimise objective() over params to a gradient 2-norm <= grad_tol: full-batch L-BFGS
        (strong Wolfe) in chunks, then Newton-CG steps, which converge quadratically where
        L-BFGS stalls (its line search compares loss values that no longer differ)."""
        start = time.perf_counter()
        info = {"lbfgs_iterations": 0, "newton_steps": 0, "cg_iterations": 0}
        opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=self.lbfgs_chunk,
            tolerance_grad=0.0,  # stopping is decided on the true gradient norm below
            tolerance_change=1e-16,
            history_size=30,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective()
            value.backward()
            return value.detach()

        norm = grad_norm(objective, params)
        stalled = 0
        while norm > self.grad_tol and info["lbfgs_iterations"] < self.lbfgs_max_iter:
            before = int(opt.state[params[0]].get("n_iter", 0))
            opt.step(closure)
            done = int(opt.state[params[0]].get("n_iter", 0)) - before
            info["lbfgs_iterations"] += done
            previous, norm = norm, grad_norm(objective, params)
            stalled = stalled + 1 if done == 0 or norm >= previous else 0
            if stalled >= 2 or norm < self.newton_from:
                break
        if norm > self.grad_tol:
            with second_order():
                newton = newton_cg(objective, params, self.grad_tol, self.newton_steps)
            info["newton_steps"] += newton["steps"]
            info["cg_iterations"] += newton["cg_iterations"]
            norm = newton["grad_norm"]
        for p in params:
            p.grad = None
        info["grad_norm"] = norm
        info["objective"] = float(objective().detach())
        info["seconds"] = time.perf_counter() - start
        warn_if_unconverged(norm, self.grad_tol, f"news-bert task: {what}", stacklevel=3)
        return info

    newton_from = 1e-5  # L-BFGS hands over to Newton-CG below this gradient norm

    def _train_pretrained(
        self, keep: torch.Tensor | None = None, init: dict | None = None
    ) -> tuple[nn.Module, dict]:
        model = self.new_pretrain_model("eager").train(False)
        if init is not None:
            model.load_state_dict(init)
        params = [p for p in model.parameters() if p.requires_grad]
        info = self._minimise(lambda: self.pretrain_objective(model, keep), params, "pretrain")
        return model, info

    def _train_finetuned(
        self, pretrained: nn.Module, scenario: str, init: dict | None = None
    ) -> tuple[nn.Module, dict]:
        """Finetune from `pretrained` (W_pt, the UPDATED anchor); `init` warm-starts the model.
        Without `init`, UPDATED starts from (W_pt, the FIXED optimum's T)."""
        self.check_scenario(scenario)
        if scenario == "updated" and init is None:
            fixed, _ = self._train_finetuned(pretrained, "fixed")
            init = {k: v.detach().clone() for k, v in fixed.state_dict().items()}
        model = self.new_finetune_model("eager").train(False)
        if init is not None:
            model.load_state_dict(init)
        w = shared_names(self.shared_prefix, pretrained, {scenario: model}, self.name)
        if scenario == "fixed" or init is None:  # W = W_pt (UPDATED: unless warm-started)
            copy_shared(pretrained, model, w)
        named = dict(pretrained.named_parameters())
        anchor = {n: named[n].detach().clone().to(DTYPE) for n in w}
        if scenario == "fixed":
            for n, p in model.named_parameters():
                p.requires_grad_(n not in anchor)
        params = [p for p in model.parameters() if p.requires_grad]
        info = self._minimise(
            lambda: self.finetune_objective(model, scenario, anchor),
            params,
            f"{scenario} finetuning",
        )
        for p in model.parameters():
            p.requires_grad_(True)
        return model, info
