"""The streaming pretraining pass against the slow obvious loop (one backward per example)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from precompute.objective import ParamSpace
from precompute.scoring import Contraction, ShardStore, TopK, naive_scores, score_pretraining


class SeqNet(nn.Module):
    """Embedding, a Linear over positions, a LayerNorm (no layer rule) and a Linear head."""

    def __init__(self, tied: bool = False, positions: bool = False):
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.pos = nn.Embedding(5, 6) if positions else None
        self.lin = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)
        self.tied = tied

    def forward(self, tokens):
        x = self.emb(tokens)
        if self.pos is not None:  # looked up once, [1, N, d], broadcast over the batch (as HF)
            x = x + self.pos(torch.arange(tokens.shape[1])[None])
        h = self.norm(torch.tanh(self.lin(x))).mean(1)
        logits = self.out(h)
        if self.tied:  # the embedding's weight used outside its forward
            logits = logits + F.linear(h, self.emb.weight)[:, :3]
        return logits


def loss_fn(model, batch):
    tokens, labels = batch
    return F.cross_entropy(model(tokens), labels, reduction="none")


def setup(tied=False, q=4, positions=False):
    torch.manual_seed(0)
    model = SeqNet(tied, positions).double()
    tokens = torch.randint(0, 20, (37, 5))
    labels = torch.randint(0, 3, (37,))
    data = TensorDataset(tokens, labels)
    space = ParamSpace.of(model, [n for n, _ in model.named_parameters()])
    s = torch.randn(q, space.size, dtype=torch.float64)
    return model, data, space, s


def streamed(model, data, space, s, k=5, batch_size=8):
    columns = {}
    result = score_pretraining(
        model,
        loss_fn,
        data,
        space,
        s,
        k,
        batch_size,
        sink=lambda start, scores: columns.__setitem__(start, scores.clone()),
    )
    return result, torch.cat([columns[i] for i in sorted(columns)], 1)


def test_streaming_pass_equals_naive_loop():
    model, data, space, s = setup()
    result, fast = streamed(model, data, space, s)
    slow = naive_scores(model, loss_fn, data, space, s)
    assert result.path == "layers"
    # Linear and Embedding by the layer rule, LayerNorm by per-example gradients
    assert set(result.vmap_params) == {"norm.weight", "norm.bias"}
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-14)


def test_weight_used_outside_its_layer_falls_back_to_per_example_gradients():
    model, data, space, s = setup(tied=True)
    with pytest.warns(UserWarning, match="disagree"):
        result, fast = streamed(model, data, space, s)
    assert result.path == "vmap"
    torch.testing.assert_close(fast, naive_scores(model, loss_fn, data, space, s))


def test_position_embedding_broadcast_over_the_batch_takes_the_vmap_path(recwarn):
    """A lookup shared by the whole batch has no per-example rows: its weight goes to the vmap
    path while the other layers keep their rules (no fallback of the whole pass, no warning)."""
    model, data, space, s = setup(positions=True)
    result, fast = streamed(model, data, space, s)
    assert result.path == "layers"
    assert set(result.vmap_params) == {"pos.weight", "norm.weight", "norm.bias"}
    assert not [w for w in recwarn if "disagree" in str(w.message)]
    torch.testing.assert_close(
        fast, naive_scores(model, loss_fn, data, space, s), rtol=1e-10, atol=1e-14
    )


def test_contraction_check_catches_a_wrong_layer_rule():
    model, data, space, s = setup()
    contraction = Contraction(model, loss_fn, space, s)
    batch = data[:8]
    assert contraction.check(batch)
    contraction.s_weight[model.lin] = contraction.s_weight[model.lin] * 2
    assert not contraction.check(batch)


def test_top_k_is_the_k_largest_and_smallest_of_the_full_scores():
    model, data, space, s = setup(q=6)
    result, full = streamed(model, data, space, s, k=4)
    torch.testing.assert_close(result.top.helpful_scores, full.topk(4, dim=1).values)
    torch.testing.assert_close(result.top.harmful_scores, (-full).topk(4, dim=1).values.neg())
    assert torch.equal(result.top.helpful_ids, full.topk(4, dim=1).indices)


def test_top_k_merges_across_batches():
    top = TopK(2)
    top.update(torch.tensor([[1.0, 5.0]]), torch.tensor([[0, 1]]))
    top.update(torch.tensor([[3.0, -2.0]]), torch.tensor([[2, 3]]))
    assert top.helpful_ids.tolist() == [[1, 2]]
    assert top.harmful_ids.tolist() == [[3, 0]]


def test_pass_refuses_non_finite_scores():
    model, data, space, s = setup()
    s[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite influence scores"):
        streamed(model, data, space, s)


class TiedNet(nn.Module):
    """An embedding whose weight is also the output layer's (tied input/output words)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.out = nn.Linear(6, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)).mean(1))


def test_weight_tied_between_embedding_and_linear_layers():
    torch.manual_seed(0)
    model = TiedNet().double()
    data = TensorDataset(torch.randint(0, 20, (23, 5)), torch.randint(0, 20, (23,)))
    space = ParamSpace.of(model, ["emb.weight"])
    s = torch.randn(3, space.size, dtype=torch.float64)
    result, fast = streamed(model, data, space, s)
    assert result.path == "layers"
    torch.testing.assert_close(fast, naive_scores(model, loss_fn, data, space, s))


def test_top_k_merge_of_parts_equals_one_list():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 50, generator=g, dtype=torch.float64)
    ids = torch.arange(50)[None, :]
    whole = TopK(6)
    whole.update(scores, ids)
    parts = TopK(6)
    for cut in ((0, 13), (13, 14), (14, 50)):
        part = TopK(6)
        part.update(scores[:, cut[0] : cut[1]], ids[:, cut[0] : cut[1]])
        parts.merge(part)
    for name in ("helpful_scores", "helpful_ids", "harmful_scores", "harmful_ids"):
        assert torch.equal(getattr(parts, name), getattr(whole, name)), name


def test_sharded_pass_equals_one_pass():
    model, data, space, s = setup(q=3)
    one, full = streamed(model, data, space, s, k=4)
    columns = {}
    sharded = score_pretraining(
        model, loss_fn, data, space, s, 4, batch_size=4, shard_size=7,
        sink=lambda start, scores: columns.__setitem__(start, scores.clone()),
    )  # fmt: skip
    torch.testing.assert_close(torch.cat([columns[i] for i in sorted(columns)], 1), full)
    assert torch.equal(sharded.top.helpful_ids, one.top.helpful_ids)
    assert torch.equal(sharded.top.harmful_ids, one.top.harmful_ids)


def test_interrupted_pass_resumes_from_its_finished_shards(tmp_path):
    model, data, space, s = setup(q=3)
    one, _ = streamed(model, data, space, s, k=4)
    seen = []

    def crash_in_third_shard(start, scores):
        seen.append(start)
        if start >= 14:
            raise KeyboardInterrupt

    store = ShardStore(tmp_path / "pass", top_k=4)
    with pytest.raises(KeyboardInterrupt):
        score_pretraining(model, loss_fn, data, space, s, 4, 7, crash_in_third_shard, None, 7,
                          store)  # fmt: skip
    assert store.count() == 2  # shards 0..6 and 7..13 are finished
    seen.clear()
    resumed = score_pretraining(
        model, loss_fn, data, space, s, 4, 7, lambda start, x: seen.append(start), None, 7,
        ShardStore(tmp_path / "pass", top_k=4),
    )  # fmt: skip
    assert seen == [14, 21, 28, 35]  # only the shards not finished ran again
    assert torch.equal(resumed.top.helpful_ids, one.top.helpful_ids)
    torch.testing.assert_close(resumed.top.harmful_scores, one.top.harmful_scores)
