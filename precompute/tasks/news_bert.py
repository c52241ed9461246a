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
  than `min_words` are dropped. ONE of its words, drawn with `mask_seed` among the
  `n_targets` most frequent words of the sentence's vocabulary, is replaced by [MASK] and is the
  label at that position (-100 elsewhere), so each example has one loss:
      g(z; W, U) = -log softmax(head(h_mask))[masked word],
  h_mask the encoder's last hidden state at the [MASK] position; head = the BERT masked-LM head
  (`cls.*`: dense, LayerNorm, and the decoder tied to the word embeddings, plus a bias).
- finetuning: the `news` split's 300 training and 100 test articles, each as [CLS] and its
  first `article_words` vocabulary words; f(x; W, T) = cross-entropy of the topic (5 classes)
  from BertForSequenceClassification's [CLS] pooler and classifier.
W = `bert.*` (embeddings and encoder), U = `cls.predictions.*` (minus the tied decoder weight,
which is W's word embedding), T = `bert.pooler.*` and `classifier.*`. Parameters named in
`frozen` are constants, set once (the attention's key and value maps and the head's dense to
fixed orthogonal matrices, LayerNorms to the identity): along them the loss is flat or
scale-free (Q K^T and V O products, a weight before a LayerNorm), which leaves no isolated
optimum.

Pretraining, in two parts, as models are pretrained and then influence is asked of them:
1. warm-up: `warmup_iterations` of full-batch L-BFGS on (1/m) sum_i g(z_i) + (warmup_l2/2)
   |theta|^2 from the seeded initialisation: a budget, not an optimum (a transformer's MLM loss
   still falls slowly through saddle regions there; thousands of iterations leave |grad| ~ 0.1).
   Its end point theta_warm is a constant of the task.
2. G(W, U) = (1/m) sum_i g(z_i) + (lp/2)|theta - theta_warm|^2, lp = pretrain_l2, minimised to
   |grad| < grad_tol. A regulariser centred at theta_warm has the Hessian lp*I of DESIGN.md's
   |theta|^2, so the scores' mathematics is unchanged, and lp above the largest negative
   curvature there makes the optimum isolated (H_G positive definite). Leave-one-out
   retraining (`msif validate`) re-minimises G without z, theta_warm kept: the scores are the
   influence of z on the last stage of pretraining, the proximal response (Bae et al. 2022,
   "If influence functions are the answer, then what is the question?").

Finetuning objectives as in DESIGN.md section 2 (`HFTask.finetune_objective`). Every objective
is float64 and minimised full-batch by L-BFGS and then Newton-CG (exact Hessian-vector products,
under precompute.objective.second_order) to a gradient 2-norm below `grad_tol`. Training runs
with eager attention (no fused kernel in the double backward); the models handed out use the
default (sdpa). Checkpoints (theta_warm too) are cached under $MSIF_CACHE like the other
built-in tasks (precompute.tasks.base).
"""

from __future__ import annotations

import collections
import re
import time
import zlib
from typing import Any

import numpy as np
import torch
from torch import nn

from precompute.hf import (
    IGNORE,
    HFTask,
    classification_losses,
    copy_shared,
    model_inputs,
    shared_names,
)
from precompute.tasks.base import BuiltinTask
from precompute.tasks.news import STOP_WORDS, TOKEN_RE, NewsTask
from precompute.tasks.training import (
    grad_norm,
    lbfgs,
    lbfgs_newton,
    sq_norm,
    warn_if_unconverged,
)

DTYPE = torch.float64
SPECIAL = ("[PAD]", "[CLS]", "[MASK]")  # ids 0, 1, 2
PAD, CLS, MASK = 0, 1, 2
WORD_RE = re.compile(TOKEN_RE.pattern, re.IGNORECASE)  # news.tokenize's words, on original case


def words_with_spans(text: str) -> list[tuple[str, int, int]]:
    """(lowercase word, start, end) of each word of `text` outside news.STOP_WORDS."""
    found = ((m.group().lower(), m.start(), m.end()) for m in WORD_RE.finditer(text))
    return [w for w in found if w[0] not in STOP_WORDS]


def mark(text: str, start: int, end: int) -> str:
    """`text` with text[start:end] in double square brackets: "shares in [[vodafone]] fell"
    (news text has single brackets of its own: "[the figures] show")."""
    return f"{text[:start]}[[{text[start:end]}]]{text[end:]}"


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
    """Pretrain a 1-layer BERT by masked-word prediction on BBC News sentences, finetune it to
    classify the topic of news articles (FIXED and UPDATED). See the module docstring."""

    name = "news-bert"
    scenarios = ("fixed", "updated")
    shared_prefix = "bert."
    pretrain_kind = "masked_lm"
    mlm_head = "cls"  # the head runs at the [MASK] position only (the same loss)
    pooling = "first"  # the [CLS] hidden state, what the classifier's pooler reads
    pretrain_l2 = 0.3  # centred at the warm-up state: see the module docstring
    finetune_l2 = 1e-2
    proximal_alpha = 1.0

    # data
    n_sentences = 3000  # drawn from the news pretraining sentences; about 1,000 survive the filter
    sample_seed = 0
    mask_seed = 1
    min_count = 2
    max_vocab = 200
    n_targets = 100  # the masked word is one of the most frequent words
    min_words = 4
    max_words = 8
    article_words = 12
    # model
    hidden = 8
    layers = 1
    heads = 1
    intermediate = 16
    init_seed = 0
    layer_norm_eps = 0.1  # not BERT's 1e-12: inputs of small norm make 1e-12 very stiff
    init_range = 0.02  # BERT's std of the initial weights
    # fixed at their initial (or set) values: directions along which the loss is flat or
    # scale-free (attention key/value products, the dense before a LayerNorm, LayerNorm gains)
    frozen = (
        "token_type_embeddings.weight",
        "attention.self.key.weight",
        "attention.self.key.bias",
        "attention.self.value.weight",
        "attention.self.value.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "LayerNorm.weight",
        "LayerNorm.bias",
    )
    orthogonal = ("key.weight", "value.weight", "transform.dense.weight")
    # training
    warmup_l2 = 3e-3  # the warm-up's |theta|^2 weight
    warmup_iterations = 1000  # L-BFGS iterations of the warm-up
    grad_tol = 1e-8
    newton_from = 1e-2  # L-BFGS hands over to Newton-CG below this gradient norm
    lbfgs_chunk = 50
    lbfgs_max_iter = 3000
    newton_steps = 8
    version = "2"
    cache_fields = (
        *BuiltinTask.cache_fields,
        *(
            "n_sentences sample_seed mask_seed min_count max_vocab n_targets min_words max_words "
            "article_words hidden layers heads intermediate init_seed layer_norm_eps init_range "
            "frozen warmup_l2 warmup_iterations grad_tol"
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
        first_word = len(SPECIAL)  # vocabulary ids below first_word + n_targets are targets
        length = self.max_words + 1
        pretrain = []
        for passage, text, draw in zip(passages, texts, draws, strict=True):
            kept = [w for w in words_with_spans(text) if w[0] in index][: self.max_words]
            targets = [j for j, w in enumerate(kept) if index[w[0]] < first_word + self.n_targets]
            if len(kept) < self.min_words or not targets:
                continue
            k = targets[int(draw * len(targets))]  # the masked word, a target word
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
        """Sizes of the data, of the trainable W, U, T and of the frozen parameters."""
        data = self._data()
        pre, fine = self.new_pretrain_model(), self.new_finetune_model()
        w = set(shared_names(self.shared_prefix, pre, {"fixed": fine}, self.name))

        def count(model, keep) -> int:
            return sum(p.numel() for n, p in model.named_parameters() if keep(n, p))

        return {
            "pretrain": len(data["pretrain"]),
            "finetune_train": len(data["finetune_train"]),
            "test": len(data["test"]),
            "vocab": len(data["vocab"]),
            "W": count(pre, lambda n, p: n in w),
            "U": count(pre, lambda n, p: n not in w and p.requires_grad),
            "T": count(fine, lambda n, p: n not in w and p.requires_grad),
            "frozen": count(pre, lambda n, p: not p.requires_grad),
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
            initializer_range=self.init_range,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=PAD,
            attn_implementation=attn_implementation,
            **extra,
        )

    def new_pretrain_model(self, attn_implementation: str = "sdpa") -> nn.Module:
        from transformers import BertForMaskedLM

        torch.manual_seed(self.init_seed)  # transformers initialises from the global generator
        model = BertForMaskedLM(self.config(attn_implementation)).to(DTYPE)
        self._freeze(model)
        return model

    def _freeze(self, model: nn.Module) -> None:
        """Set the `frozen` parameters to their fixed values and freeze them."""
        for name, p in model.named_parameters():
            if not name.endswith(self.frozen):
                continue
            with torch.no_grad():
                if name.endswith(self.orthogonal):  # the same matrix in every model
                    seed = self.init_seed * 7919 + zlib.crc32(name.encode())
                    generator = torch.Generator().manual_seed(seed)
                    q, r = torch.linalg.qr(torch.randn(p.shape, generator=generator, dtype=DTYPE))
                    p.copy_(q * torch.sign(torch.diagonal(r)))
                elif name.endswith("LayerNorm.weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            p.requires_grad_(False)

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
        model = BertForSequenceClassification(config).to(DTYPE)
        self._freeze(model)
        return model

    # -------------------------------------------------------------------------------- training
    def _minimise(self, objective, params: list[torch.Tensor], what: str) -> dict:
        """Minimise objective() over params to a gradient 2-norm <= grad_tol
        (training.lbfgs_newton); the record, timed; a warning where it stops short."""
        start = time.perf_counter()
        info = lbfgs_newton(
            objective,
            params,
            self.grad_tol,
            newton_from=self.newton_from,
            chunk=self.lbfgs_chunk,
            max_iter=self.lbfgs_max_iter,
            newton_steps=self.newton_steps,
        )
        info["objective"] = float(objective().detach())
        info["seconds"] = time.perf_counter() - start
        warn_if_unconverged(
            info["grad_norm"], self.grad_tol, f"news-bert task: {what}", stacklevel=3
        )
        return info

    def warmup_state(self) -> dict[str, torch.Tensor]:
        """theta_warm, the centre of G's regulariser (cached like the checkpoints)."""
        return self._cached_state("warmup", self._train_warmup, self.new_pretrain_model)

    def _train_warmup(self) -> tuple[nn.Module, dict]:
        """`warmup_iterations` of full-batch L-BFGS on (1/m) sum_i g(z_i) + (warmup_l2/2)
        |theta|^2 from the seeded initialisation: a budget, as models are pretrained, not an
        optimum (the loss still falls slowly through saddle regions there)."""
        start = time.perf_counter()
        model = self.new_pretrain_model("eager").eval()
        params = [p for p in model.parameters() if p.requires_grad]

        def objective() -> torch.Tensor:
            return self.pretrain_data_term(model) + 0.5 * self.warmup_l2 * sq_norm(params)

        opt, closure = lbfgs(objective, params, self.warmup_iterations, tolerance_change=0.0)
        opt.step(closure)
        for p in params:
            p.grad = None
        info = {
            "lbfgs_iterations": int(opt.state[params[0]]["n_iter"]),
            "grad_norm": grad_norm(objective, params),
            "objective": float(objective().detach()),
            "seconds": time.perf_counter() - start,
        }
        return model, info

    def pretrain_objective(self, model: nn.Module, keep=None, centre=None) -> torch.Tensor:
        """G = (1/m) sum_i keep_i g(z_i) + (lp/2)|theta - theta_warm|^2 (centre: theta_warm)."""
        centre = self.warmup_state() if centre is None else centre
        return super().pretrain_objective(model, keep, centre)

    def _train_pretrained(
        self, keep: torch.Tensor | None = None, init: dict | None = None
    ) -> tuple[nn.Module, dict]:
        """Minimise G (eager attention: Newton-CG differentiates twice) from `init` or from
        theta_warm."""
        model = self.new_pretrain_model("eager").eval()
        model.load_state_dict(self.warmup_state() if init is None else init)
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
        model = self.new_finetune_model("eager").eval()
        if init is not None:
            model.load_state_dict(init)
        w = shared_names(self.shared_prefix, pretrained, {scenario: model}, self.name)
        if scenario == "fixed" or init is None:  # W = W_pt (UPDATED: unless warm-started)
            copy_shared(pretrained, model, w)
        named = dict(pretrained.named_parameters())
        anchor = {n: named[n].detach().clone().to(DTYPE) for n in w}
        if scenario == "fixed":
            for n in anchor:
                model.get_parameter(n).requires_grad_(False)
            objective = self._fixed_objective(model)
        else:

            def objective():
                return self.finetune_objective(model, scenario, anchor)

        params = [p for p in model.parameters() if p.requires_grad]
        info = self._minimise(objective, params, f"{scenario} finetuning")
        if scenario == "fixed":  # the same objective through the whole model, as msif sees it
            full = grad_norm(lambda: self.finetune_objective(model, "fixed", anchor), params)
            info["grad_norm_full_model"] = full
        for n in anchor:
            model.get_parameter(n).requires_grad_(True)
        return model, info

    def _fixed_objective(self, model: nn.Module):
        """F(T) of the FIXED scenario with W frozen: the encoder's last hidden states of the
        finetuning articles are computed once, then only the pooler and classifier (T) run."""
        data = self.finetune_train_data()
        batch = data.batch(0, len(data))
        with torch.no_grad():
            hidden = model.bert(**model_inputs(model, batch)).last_hidden_state
        labels = batch["labels"]
        head = [p for n, p in model.named_parameters() if p.requires_grad]

        def objective() -> torch.Tensor:
            logits = model.classifier(model.dropout(model.bert.pooler(hidden)))
            ce = classification_losses(logits, labels).mean()
            return ce + 0.5 * self.finetune_l2 * sq_norm(head)

        return objective
