"""Layer rules (precompute.layers) for convolutions and GPT-2's Conv1D: the pass equals vmapped
per-example gradients, and EK-FAC's convolution blocks equal a dense reference built here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from precompute.ekfac import EKFAC
from precompute.objective import Objective, ParamSpace
from precompute.scoring import Contraction

CONVS = {
    "conv2d_stride_pad": lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1),
    "conv2d_rect_dilation": lambda: nn.Conv2d(
        2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)
    ),  # fmt: skip
    "conv2d_groups": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "conv2d_same_reflect_nobias": lambda: nn.Conv2d(
        2, 4, 3, padding="same", padding_mode="reflect", bias=False
    ),
    "conv2d_same_even_kernel": lambda: nn.Conv2d(2, 4, 2, padding="same"),
    "conv2d_circular": lambda: nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"),
    "conv1d_stride_dilation": lambda: nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2),
    "conv1d_groups_same": lambda: nn.Conv1d(4, 6, 3, groups=2, padding="same"),
}


class ConvNet(nn.Module):
    """conv -> tanh -> flatten -> Linear head."""

    def __init__(self, conv: nn.Module, example: torch.Tensor):
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            width = conv(example[:1]).numel()
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def conv_setup(name, n=12, q=3):
    torch.manual_seed(0)
    conv = CONVS[name]().double()
    shape = (n, conv.in_channels, 6, 5) if isinstance(conv, nn.Conv2d) else (n, conv.in_channels, 7)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    model = ConvNet(conv, x).double()
    space = ParamSpace.of(model, [k for k, _ in model.named_parameters()])
    s = torch.randn(q, space.size, dtype=torch.float64)
    return model, TensorDataset(x, y), space, s


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_rule_equals_vmapped_per_example_gradients(name):
    model, data, space, s = conv_setup(name)
    contraction = Contraction(model, loss_fn, space, s)
    assert "conv.weight" in contraction.layer_params  # scored by the rule, not by vmap
    batch = data[:]
    torch.testing.assert_close(contraction(batch), contraction.plain(batch), rtol=1e-10, atol=1e-12)


def test_gpt2_conv1d_rule_equals_vmapped_per_example_gradients():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = conv1d(5, 3)  # nf = 5 outputs, nx = 3 inputs; weight [3, 5]
            self.head = nn.Linear(5, 2)

        def forward(self, x):  # [B, T, 3]
            return self.head(torch.tanh(self.proj(x)).mean(1))

    torch.manual_seed(0)
    model = Net().double()
    x, y = torch.randn(9, 4, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    space = ParamSpace.of(model, [k for k, _ in model.named_parameters()])
    s = torch.randn(3, space.size, dtype=torch.float64)
    contraction = Contraction(model, loss_fn, space, s)
    assert contraction.layer_params == ["proj.weight", "proj.bias", "head.weight", "head.bias"]
    torch.testing.assert_close(contraction((x, y)), contraction.plain((x, y)), rtol=1e-10, atol=0)


# ---- EK-FAC: a dense reference written from the KFC definitions ----------------------------


def patches_reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Zero-padded input patches [B, groups, N, in/groups * kh * kw] (plus a ones column)."""
    unfolded = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    groups = conv.groups
    per_group = unfolded.reshape(len(x), groups, -1, unfolded.shape[-1]).transpose(2, 3)
    return torch.cat([per_group, torch.ones_like(per_group[..., :1])], -1)


def test_ekfac_conv_blocks_match_a_dense_reference():
    model, data, space, _ = conv_setup("conv2d_groups", n=16)
    conv = model.conv
    reg = torch.full((space.size,), 0.1, dtype=torch.float64)
    curvature = EKFAC(Objective(model, loss_fn, data, space, reg, batch_size=5)).fit()
    block = next(b for b in curvature.blocks if b.weight == "conv.weight")
    assert block.bias == "conv.bias" and block.q_a.shape == (2, 2 * 9 + 1, 2 * 9 + 1)

    x, y = data[:]
    groups, out_g = conv.groups, conv.out_channels // conv.groups
    # A = sum over examples and positions of patch outer products, S of output gradients
    a = patches_reference(conv, x)  # [B, G, N, I]
    outputs = []
    handle = conv.register_forward_hook(lambda m, i, o: outputs.append(o))
    loss = loss_fn(model, (x, y)).sum()
    handle.remove()
    (g,) = torch.autograd.grad(loss, outputs)
    g = g.reshape(len(x), groups, out_g, -1).transpose(2, 3)  # [B, G, N, O]
    # per-example weight gradients, one backward each, laid out [G, O, I + bias]
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        w, b = torch.autograd.grad(
            loss_fn(model, (x[i : i + 1], y[i : i + 1])).sum(),
            [params["conv.weight"], params["conv.bias"]],
        )
        rows.append(torch.cat([w.reshape(groups, out_g, -1), b.reshape(groups, out_g, 1)], -1))
    per_example = torch.stack(rows)  # [B, G, O, I]
    dense_blocks = []
    for c in range(groups):
        _, q_a = torch.linalg.eigh(torch.einsum("bni,bnj->ij", a[:, c], a[:, c]))
        _, q_s = torch.linalg.eigh(torch.einsum("bno,bnp->op", g[:, c], g[:, c]))
        rotated = q_s.T @ per_example[:, c] @ q_a
        eigenvalues = (rotated**2).mean(0)
        torch.testing.assert_close(
            block.eigenvalues[c], eigenvalues, rtol=1e-8, atol=1e-12
        )  # same basis up to signs, so the same corrected eigenvalues
        basis = torch.kron(q_s, q_a)
        dense_blocks.append(basis @ torch.diag(eigenvalues.reshape(-1)) @ basis.T)
    # the solve on the conv block equals the dense block's inverse (other blocks left at zero)
    damping = 0.05
    size = per_example[0].numel()
    dense = torch.block_diag(*dense_blocks) + (0.1 + damping) * torch.eye(size, dtype=torch.float64)
    rhs_matrix = torch.randn(2, groups, out_g, per_example.shape[-1], dtype=torch.float64)
    expected = torch.linalg.solve(dense, rhs_matrix.reshape(2, -1).T).T.reshape(rhs_matrix.shape)
    rhs = torch.zeros(2, space.size, dtype=torch.float64)
    blocks = space.unflatten(rhs)
    blocks["conv.weight"].copy_(rhs_matrix[..., :-1].reshape(2, *conv.weight.shape))
    blocks["conv.bias"].copy_(rhs_matrix[..., -1].reshape(2, -1))
    solved = space.unflatten(curvature.solve(rhs, damping))
    got = torch.cat(
        [
            solved["conv.weight"].reshape(2, groups, out_g, -1),
            solved["conv.bias"].reshape(2, groups, out_g, 1),
        ],
        -1,
    )
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
