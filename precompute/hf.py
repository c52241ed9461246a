"""Hugging Face `transformers` models as msif tasks, without boilerplate: `HFTask`.

A user subclasses `HFTask`, hands over the trained models and the examples of both stages, and
names the shared prefix (W = the parameters whose names start with it, e.g. "bert." or
"transformer."); `HFTask` supplies the rest of the task contract (DESIGN.md section 4) from the
conventions of `transformers`:

- examples: map-style datasets (a list, a torch Dataset, a `datasets.Dataset`) of dicts with
  `input_ids`, `attention_mask` and `labels` (token_type_ids and position_ids are passed on
  too), every example padded to one length; an optional `text` (a str) is what `describe`
  shows. Only these integer fields go through msif's DataLoader, stacked once (`TensorExamples`);
- per-example pretraining loss g(z), by `pretrain_kind` (default "auto": from the model class):
    masked_lm:  g(z) = mean over the positions n of z with labels_n != -100 of
                -log softmax(logits_n)[labels_n]  (0 for an example without such a position);
    causal_lm:  g(z) = mean over the positions n >= 1 with labels_n != -100 of
                -log softmax(logits_{n-1})[labels_n], the next-token loss (labels default to
                input_ids with padding ignored);
    model_loss: g(z) = model(**z, labels=z.labels).loss, one forward per example;
- per-example finetuning loss f(x) = -log softmax(logits)[label] from the logits of a
  sequence-classification model, reduction="none" (never the model's batch-mean `loss`);
- `represent`: the last hidden state of the shared encoder (`model.base_model`) pooled by
  `pooling`: "mean" over the attended tokens, "first" ([CLS]) or "last" (last attended token);
- `describe`: the example's `text`, and for a test its label and class name (`class_names`,
  else the finetuned model's `config.id2label`).

Tied weights: `named_parameters()` lists a tensor once, under its first name, so an LM head's
decoder weight tied to the word embeddings IS the shared `...word_embeddings.weight` (one block
for the solvers, its gradient summed over both uses). Parameters only in the pretrained model (its
head) are U; parameters only in the finetuned model (a pooler, the classifier) are T.

Attention masks reach the models as an additive [B, 1, L, L] float mask (0 where a query may
attend a key, the dtype's minimum elsewhere; causal where the model is), built here from the 0/1
`attention_mask`: given a 0/1 mask, `transformers` reads its VALUES to decide whether it may skip
it, data-dependent control flow that torch.func.vmap (msif's per-example gradients) refuses. A 4D
mask is used as given by eager and fused (sdpa) attention alike, and gives the same outputs.
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from precompute.task import MultiStageTask, TaskError
from precompute.tasks.training import sq_norm

IGNORE = -100  # the label of a position without a loss, as in transformers
MODEL_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")
INPUT_FIELDS = ("input_ids", "token_type_ids", "position_ids")  # passed to forward unchanged
KINDS = ("auto", "masked_lm", "causal_lm", "model_loss")
POOLINGS = ("mean", "first", "last")
EXAMPLES = {"pretrain": "pretrain", "finetune_train": "finetune_train", "test": "finetune_test"}


class TensorExamples(torch.utils.data.Dataset):
    """The model fields (`MODEL_FIELDS`) of a dataset of dicts, stacked once into int64 tensors.

    Item i is {field: tensor} of example i, so the DataLoader's default collation gives [B, L]
    tensors (a classification label: [B]). Other fields (text, ids, ...) stay out. TaskError
    (one sentence, starting with `what`) for a dataset that is empty, not of dicts with
    input_ids, missing a field, or of unequal lengths.
    """

    def __init__(self, examples: Any, what: str) -> None:
        try:
            count = len(examples)
        except TypeError as exc:
            raise TaskError(f"{what} must be a map-style dataset with a length") from exc
        if count == 0:
            raise TaskError(f"{what} is empty")
        first = examples[0]
        if not isinstance(first, Mapping) or "input_ids" not in first:
            raise TaskError(
                f"{what}[0] must be a dict with input_ids (and attention_mask, labels), "
                f"not {type(first).__name__}"
            )
        self.fields = tuple(f for f in MODEL_FIELDS if f in first)
        rows: dict[str, list[torch.Tensor]] = {f: [] for f in self.fields}
        for i in range(count):
            example = examples[i]
            for f in self.fields:
                if f not in example:
                    raise TaskError(f"{what}[{i}] has no {f!r}, which {what}[0] has")
                rows[f].append(torch.as_tensor(example[f]))
        self.tensors: dict[str, torch.Tensor] = {}
        for f, values in rows.items():
            shapes = sorted({tuple(v.shape) for v in values})
            if len(shapes) > 1:
                raise TaskError(
                    f"{what}: {f} comes in shapes {shapes[:3]}; pad every example to one "
                    "length (padding='max_length')"
                )
            stacked = torch.stack(values)
            if stacked.is_floating_point() or stacked.is_complex():
                raise TaskError(f"{what}: {f} must hold integers, not {stacked.dtype}")
            self.tensors[f] = stacked.long()

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {f: t[index] for f, t in self.tensors.items()}

    def batch(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Examples start..stop-1 as one collated batch."""
        return {f: t[start:stop] for f, t in self.tensors.items()}


# ------------------------------------------------------------------------------ model inputs
_CAUSAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_causal(model: nn.Module) -> bool:
    """Does the model attend causally (each token to itself and the ones before it)? From its
    attention modules' `is_causal` flags, else `config.is_decoder`; remembered per model."""
    if model not in _CAUSAL:
        flags = [
            m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)
        ]
        config = getattr(model, "config", None)
        _CAUSAL[model] = any(flags) if flags else bool(getattr(config, "is_decoder", False))
    return _CAUSAL[model]


def attention_bias(attention_mask: torch.Tensor, causal: bool, dtype) -> torch.Tensor:
    """Additive mask [B, 1, L, L] from a 0/1 mask [B, L]: 0 where query q may attend key k
    (attention_mask[k] = 1, and k <= q when causal), the dtype's minimum elsewhere."""
    allowed = attention_mask.bool()[:, None, None, :]
    if causal:
        order = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
        allowed = allowed & (order[None, :] <= order[:, None])
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def model_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments of the model's forward for a collated batch: the input fields on the
    model's device, the attention mask as an additive 4D mask (module docstring), no cache."""
    param = next(model.parameters())
    inputs: dict[str, Any] = {f: batch[f].to(param.device) for f in INPUT_FIELDS if f in batch}
    if "attention_mask" in batch:
        mask = batch["attention_mask"].to(param.device)
        inputs["attention_mask"] = attention_bias(mask, is_causal(model), param.dtype)
    if getattr(getattr(model, "config", None), "use_cache", False):
        inputs["use_cache"] = False  # one pass, nothing generated: no key/value cache
    return inputs


# ------------------------------------------------------------------------- per-example losses
def masked_lm_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: per example, the mean over its positions n with labels[n] != -100 of the
    cross-entropy of logits[n] (logits [B, N, V], labels [B, N]); 0 without such a position."""
    token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    count = (labels != IGNORE).sum(1).clamp_min(1)
    return token.sum(1) / count.to(token.dtype)


def causal_lm_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: per example, the mean next-token cross-entropy, logits[n - 1] predicting labels[n]
    over the n >= 1 with labels[n] != -100 (labels unshifted, as transformers takes them)."""
    return masked_lm_losses(logits[:, :-1], labels[:, 1:])


def classification_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: per example, -log softmax(logits)[label] (logits [B, C], labels [B])."""
    return F.cross_entropy(logits, labels.reshape(-1), reduction="none")


def masked_positions(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, k], labels there [B, k]): the first k positions of each row whose label
    is not -100, in order; a row with fewer fills up with positions labelled -100. Shapes do
    not depend on the values, so this runs under torch.func.vmap."""
    length = labels.shape[1]
    # masked positions get keys length..1 (earlier = larger), the others 0: top-k = the first k
    key = (labels != IGNORE).long() * torch.arange(length, 0, -1, device=labels.device)
    top = key.topk(k, dim=1)
    picked = labels.gather(1, top.indices).masked_fill(top.values == 0, IGNORE)
    return top.indices, picked


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """[B, L, d] -> [B, d]: the mean over attended tokens ("mean"), the first token ("first"),
    or the last attended token ("last": before the first padding, with right padding)."""
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.device)
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if how == "first":
        return hidden[:, 0]
    if how == "last":
        last = (torch.arange(mask.shape[1], device=mask.device) * (mask != 0)).argmax(1)
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}: use one of {', '.join(POOLINGS)}")


def detect_kind(model: nn.Module) -> str:
    """The pretraining kind of `model`: "masked_lm" or "causal_lm" where transformers lists its
    class as one, else
    "model_loss"."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__

    def listed(mapping: Mapping) -> bool:
        values = (v if isinstance(v, (tuple, list)) else (v,) for v in mapping.values())
        return any(name in v for v in values)

    if listed(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        return "masked_lm"
    if listed(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "causal_lm"
    return "model_loss"


# ---------------------------------------------------------------------------- shared parameters
def shared_names(
    prefix: str, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], task: str = "hf"
) -> list[str]:
    """W: the trainable parameters of the pretrained model whose names start with `prefix` and
    that every finetuned model has, in the pretrained model's order. TaskError (one sentence)
    when there are none or a shape differs between the models."""
    if not isinstance(prefix, str) or not prefix:
        raise TaskError(f"task {task!r}: set shared_prefix, e.g. 'bert.' or 'transformer.'")
    mine = {n: p for n, p in pretrained.named_parameters() if n.startswith(prefix)}
    if not mine:
        some = ", ".join(n for n, _ in list(pretrained.named_parameters())[:3])
        raise TaskError(
            f"task {task!r}: no parameter of the pretrained model starts with shared_prefix "
            f"{prefix!r} (its parameters begin {some}, ...)"
        )
    names = [n for n, p in mine.items() if p.requires_grad]  # frozen ones are constants
    for scenario, model in finetuned.items():
        theirs = dict(model.named_parameters())
        names = [n for n in names if n in theirs]
        for n in names:
            if theirs[n].shape != mine[n].shape:
                raise TaskError(
                    f"task {task!r}: shared parameter {n!r} has shape {tuple(mine[n].shape)} in "
                    f"the pretrained model but {tuple(theirs[n].shape)} in the finetuned model "
                    f"({scenario})"
                )
    if not names:
        raise TaskError(
            f"task {task!r}: no trainable parameter named {prefix!r}... is in both the "
            "pretrained and the finetuned models"
        )
    return names


def copy_shared(pretrained: nn.Module, finetuned: nn.Module, names: Sequence[str]) -> None:
    """Set the finetuned model's parameters `names` (W) to the pretrained model's values."""
    source = dict(pretrained.named_parameters())
    target = dict(finetuned.named_parameters())
    with torch.no_grad():
        for n in names:
            target[n].copy_(source[n])


# ------------------------------------------------------------------------------------ the task
class HFTask(MultiStageTask):
    """A MultiStageTask for a `transformers` pretrained model (masked LM, causal LM, or any model
    whose forward with labels gives a loss) and sequence-classification models finetuned from
    it, FIXED and/or UPDATED (module docstring: the conventions).

    Set `shared_prefix` (W: the parameters named with it in both models), `name`, and the
    regularisers the models were trained with (`pretrain_l2`, `finetune_l2`, `proximal_alpha`;
    the objectives of DESIGN.md section 2, `pretrain_objective` / `finetune_objective` below);
    optionally `pretrain_kind`, `mlm_head`, `pooling`, `class_names`.
    Implement `pretrained_model()`, `finetuned_model(scenario)` (trained models) and
    `pretrain_examples()`, `finetune_train_examples()`, `finetune_test_examples()`.
    """

    name = "hf"
    shared_prefix: str = ""
    pretrain_kind: str = "auto"  # one of KINDS
    mlm_head: str | None = None  # masked LM head module (BERT: "cls"), run at masked positions
    pooling: str = "mean"  # one of POOLINGS, for `represent`
    class_names: Sequence[str] | Mapping[int, str] | None = None  # else config.id2label
    objective_batch_size: int = 4096  # examples per forward in pretrain/finetune_objective

    def __init__(self) -> None:
        super().__init__()
        self._tensors: dict[str, TensorExamples] = {}
        self._shared: list[str] | None = None
        self._id2label: dict[int, str] | None = None
        self._most_masked: int | None = None  # most masked positions of a pretraining example
        self._kind: str | None = None  # the pretraining kind, once a pretraining model was seen

    # ---------------------------------------------------------------- for the user to provide
    @abc.abstractmethod
    def pretrain_examples(self) -> Any:
        """Pretraining examples: dicts with input_ids, attention_mask, labels (masked LM: the
        token at the masked positions, -100 elsewhere), optionally text."""

    @abc.abstractmethod
    def finetune_train_examples(self) -> Any:
        """Finetuning training examples: dicts with input_ids, attention_mask, labels (a class
        id), optionally text."""

    @abc.abstractmethod
    def finetune_test_examples(self) -> Any:
        """Finetuning test examples, like `finetune_train_examples`."""

    # ----------------------------------------------------------------------------------- data
    def examples(self, split: str) -> Any:
        """The user's examples of `split` ("pretrain", "finetune_train" or "test")."""
        if split not in EXAMPLES:
            raise ValueError(f"unknown split {split!r}: use one of {', '.join(EXAMPLES)}")
        return getattr(self, f"{EXAMPLES[split]}_examples")()

    def tensors(self, split: str) -> TensorExamples:
        """The model fields of `split`'s examples, stacked once (`TensorExamples`)."""
        if split not in self._tensors:
            what = f"task {self.name!r}: {EXAMPLES[split]}_examples()"
            self._tensors[split] = TensorExamples(self.examples(split), what)
        return self._tensors[split]

    def pretrain_data(self) -> TensorExamples:
        return self.tensors("pretrain")

    def finetune_train_data(self) -> TensorExamples:
        return self.tensors("finetune_train")

    def finetune_test_data(self) -> TensorExamples:
        return self.tensors("test")

    # --------------------------------------------------------------------------------- models
    def shared_parameters(self) -> list[str]:
        """W (see `shared_names`); the models are fetched for it once, on the first call."""
        if self._shared is None:
            finetuned = {s: self.finetuned_model(s) for s in self.scenarios}
            self._shared = shared_names(
                self.shared_prefix, self.pretrained_model(), finetuned, self.name
            )
        return list(self._shared)

    def kind_of(self, model: nn.Module) -> str:
        """The pretraining loss used for `model`: `pretrain_kind`, or detected from its class."""
        if self.pretrain_kind not in KINDS:
            raise TaskError(
                f"task {self.name!r}: pretrain_kind {self.pretrain_kind!r} is unknown: use one "
                f"of {', '.join(KINDS)}"
            )
        return detect_kind(model) if self.pretrain_kind == "auto" else self.pretrain_kind

    # ------------------------------------------------------------------ losses and outputs
    def pretrain_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example g(z; W, U), shape [B], by the pretraining kind (module docstring):
        `pretrain_loss_from_outputs(pretrain_outputs(model, batch), batch)`, except for
        model_loss (the model's own loss, one forward per example)."""
        if self._pretrain_kind(model) == "model_loss":
            labels = self._labels(model, batch, required=True)
            inputs = model_inputs(model, batch)
            rows = [
                model(**{k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in inputs.items()},
                      labels=labels[i : i + 1]).loss
                for i in range(len(labels))
            ]  # fmt: skip
            return torch.stack(rows)
        return self.pretrain_loss_from_outputs(self.pretrain_outputs(model, batch), batch)

    def pretrain_outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The logits the pretraining loss sees, [B, N, V] (the network function f of the
        Gauss-Newton curvature, `--curvature ggn`): masked_lm with `mlm_head`, the head at the
        first k masked positions of each example (k = the most any pretraining example has);
        masked_lm without it, every position; causal_lm, positions 0..L-2 (each predicting the
        next token)."""
        kind = self._pretrain_kind(model)
        if kind == "model_loss":
            raise TaskError(
                f"task {self.name!r}: pretrain_kind 'model_loss' has no logits for the "
                "Gauss-Newton curvature: set pretrain_kind to masked_lm or causal_lm, or use "
                "--curvature hessian"
            )
        inputs = model_inputs(model, batch)
        if kind == "masked_lm" and self.mlm_head is not None:
            labels = self._labels(model, batch, required=True)
            hidden = model.base_model(**inputs).last_hidden_state  # [B, L, d]
            positions, _ = masked_positions(labels, min(self._most_masked_count(), labels.shape[1]))
            at = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            return model.get_submodule(self.mlm_head)(at)
        logits = model(**inputs).logits
        return logits if kind == "masked_lm" else logits[:, :-1]

    def pretrain_loss_from_outputs(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """g as a function of `pretrain_outputs`, [B]: the mean cross-entropy of the logits at
        the positions with a label (convex in the logits)."""
        kind = self._kind or (None if self.pretrain_kind == "auto" else self.pretrain_kind)
        if kind is None:  # "auto" is read from the model's class, seen by pretrain_outputs
            raise RuntimeError("pretrain_loss_from_outputs needs pretrain_outputs called first")
        labels = batch.get("labels")
        labels = None if labels is None else labels.to(outputs.device)
        if kind == "masked_lm":
            if labels is None:
                raise TaskError(f"task {self.name!r}: masked_lm pretraining examples need labels")
            if self.mlm_head is not None:
                labels = masked_positions(labels, outputs.shape[1])[1]
            return masked_lm_losses(outputs, labels)
        if labels is None:  # next-token targets: the inputs, padding ignored
            labels = batch["input_ids"].to(outputs.device)
            if "attention_mask" in batch:
                pad = batch["attention_mask"].to(labels.device) == 0
                labels = labels.masked_fill(pad, IGNORE)
        return masked_lm_losses(outputs, labels[:, 1:])

    def _pretrain_kind(self, model: nn.Module) -> str:
        """kind_of(model), remembered for pretrain_loss_from_outputs (which sees no model)."""
        self._kind = self.kind_of(model)
        return self._kind

    def _labels(self, model: nn.Module, batch: Any, required: bool) -> torch.Tensor | None:
        if "labels" not in batch:
            if required:
                kind = self._pretrain_kind(model)
                raise TaskError(f"task {self.name!r}: {kind} pretraining examples need labels")
            return None
        return batch["labels"].to(next(model.parameters()).device)

    def _most_masked_count(self) -> int:
        """The most masked positions of a pretraining example: a shape, so a Python int known
        before any vmap."""
        if self._most_masked is None:
            masked = self.pretrain_data().tensors["labels"] != IGNORE
            self._most_masked = int(masked.sum(1).max().clamp_min(1))
        return self._most_masked

    def finetune_logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Class logits [B, C] of the sequence-classification model."""
        return model(**model_inputs(model, batch)).logits

    def finetune_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example f(x; W, T) = -log softmax(logits)[label], shape [B]."""
        return self.finetune_loss_from_outputs(self.finetune_outputs(model, batch), batch)

    def finetune_outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The class logits [B, C]: the network function of the Gauss-Newton curvature."""
        return self.finetune_logits(model, batch)

    def finetune_loss_from_outputs(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """f as a function of the logits, [B]: -log softmax(outputs)[label]."""
        return classification_losses(outputs, batch["labels"].to(outputs.device))

    def represent(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The shared encoder's last hidden state pooled by `pooling`, [B, d]."""
        hidden = model.base_model(**model_inputs(model, batch)).last_hidden_state
        return pool(hidden, batch.get("attention_mask"), self.pooling)

    # ----------------------------------------------------------------------------- describe
    def class_name(self, label: int) -> str:
        """Finetuning class `label`'s name: `class_names`, else the finetuned model's
        config.id2label, else "class <label>"."""
        names = self.class_names
        if names is None:
            if self._id2label is None:
                config = self.finetuned_model(self.scenarios[0]).config
                self._id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
            names = self._id2label
        if isinstance(names, Mapping):
            return str(names.get(label, f"class {label}"))
        return str(names[label]) if 0 <= label < len(names) else f"class {label}"

    def describe(self, split: str, index: int) -> dict:
        """{"label", "label_name", "text", "image": None} of example `index` of `split`: its
        `text` (None without one); pretraining examples have no label."""
        example = self.examples(split)[int(index)]
        text = example.get("text") if isinstance(example, Mapping) else None
        if split == "pretrain":
            return {"label": None, "label_name": None, "text": text, "image": None}
        label = int(torch.as_tensor(example["labels"]).reshape(-1)[0])
        return {"label": label, "label_name": self.class_name(label), "text": text, "image": None}

    # ------------------------------------------------------------- the training objectives
    def pretrain_objective(
        self,
        model: nn.Module,
        keep: torch.Tensor | None = None,
        centre: Mapping[str, torch.Tensor] | None = None,
    ):
        """G(W, U) = (1/m) sum_i keep_i g(z_i) + (lp/2) |theta - c|^2, theta = every trainable
        parameter of the pretrained model (a tied tensor once); m = all pretraining examples
        even where `keep` drops some, so that dropping z is upweighting it by -1/m. The centre
        c = `centre` ({name: value}), 0 when None: the Hessian is the same lp*I either way, so
        the scores' mathematics holds for a centred regulariser too."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if centre is None:
            reg = sq_norm([p for _, p in named])
        else:
            reg = sum(((p - centre[n].to(p)) ** 2).sum() for n, p in named)
        return self.pretrain_data_term(model, keep) + 0.5 * self.pretrain_l2 * reg

    def pretrain_data_term(self, model: nn.Module, keep: torch.Tensor | None = None):
        """(1/m) sum_i keep_i g(z_i), m = all pretraining examples (G without its regulariser)."""
        data = self.pretrain_data()
        total = 0.0
        for start in range(0, len(data), self.objective_batch_size):
            losses = self.pretrain_loss(model, data.batch(start, start + self.objective_batch_size))
            if keep is not None:
                losses = losses * keep[start : start + len(losses)].to(losses)
            total = total + losses.sum()
        return total / len(data)

    def finetune_objective(
        self, model: nn.Module, scenario: str, anchor: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The finetuning objective of `scenario` at `model`; `anchor` = {name: W_pt} names W.
        FIXED: (1/n) sum_j f(x_j) + (lf/2)|T|^2. UPDATED: that + (lf/2)|W|^2
        + (a/2)|W - W_pt|^2. T = the model's trainable parameters outside W."""
        data = self.finetune_train_data()
        total = 0.0
        for start in range(0, len(data), self.objective_batch_size):
            batch = data.batch(start, start + self.objective_batch_size)
            total = total + self.finetune_loss(model, batch).sum()
        named = dict(model.named_parameters())
        head = [p for n, p in named.items() if n not in anchor and p.requires_grad]
        value = total / len(data) + 0.5 * self.finetune_l2 * sq_norm(head)
        if scenario == "fixed":
            return value
        if scenario != "updated":
            raise ValueError(f"unknown scenario {scenario!r}: use 'fixed' or 'updated'")
        shared = [named[n] for n in anchor]
        prox = sum(((named[n] - w.to(named[n])) ** 2).sum() for n, w in anchor.items())
        return value + 0.5 * self.finetune_l2 * sq_norm(shared) + 0.5 * self.proximal_alpha * prox
