"""Benchmark: the streaming pretraining pass against a naive one-example-at-a-time loop.

Same model, data and Q test-side vectors for both; each method runs in its own subprocess so
that its peak memory (max RSS, plus peak CUDA memory on a GPU) is its own. Prints both times,
their ratio, and the pass time against its floor: 2*Q*m*p floating-point operations at the
matrix-multiply rate measured on this machine in the same run.

    python benchmarks/pretraining_pass.py                    # m=20000, Q=32, CPU
    python benchmarks/pretraining_pass.py --device cuda --m 200000
    python benchmarks/pretraining_pass.py --m 20000,80000 --skip-naive   # memory vs m
    python benchmarks/pretraining_pass.py --model passages --m 20000,80000 --skip-naive
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from precompute.objective import ParamSpace
from precompute.scoring import naive_scores, score_pretraining

INPUTS, CLASSES = 200, 10
VOCAB, DIM, LENGTH, TARGETS = 3200, 32, 32, 300  # the `news` task's passage model


class Passages(nn.Module):
    """Mean word embedding of a passage -> a held-out word (the `news` pretraining model)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.head = nn.Linear(DIM, TARGETS)

    def forward(self, tokens):
        mask = (tokens != 0).unsqueeze(-1).to(self.embedding.weight.dtype)
        mean = (self.embedding(tokens) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(mean)


def model_and_data(
    m: int, q: int, device: str, model_name: str = "mlp", seed: int = 0, classes: int = CLASSES
):
    """A model, m synthetic examples and q random test-side vectors.

    mlp: a 51.6k-parameter tanh MLP on 200 inputs (`classes` outputs, 10 by default).
    passages: the `news` model (a 3,200 x 32 word embedding and a 32 -> 300 head, 112k
    parameters) on padded passages of 32 tokens.
    """
    torch.manual_seed(seed)
    if model_name == "mlp":
        model = nn.Sequential(
            nn.Linear(INPUTS, 192), nn.Tanh(), nn.Linear(192, 64), nn.Tanh(),
            nn.Linear(64, classes),
        )  # fmt: skip
        x = torch.randn(m, INPUTS)
        y = torch.randint(0, classes, (m,))
    else:
        model = Passages()
        lengths = torch.randint(5, LENGTH + 1, (m, 1))
        x = torch.randint(1, VOCAB, (m, LENGTH)) * (torch.arange(LENGTH) < lengths)
        y = torch.randint(0, TARGETS, (m,))
    model = model.to(device)
    space = ParamSpace.of(model, [n for n, _ in model.named_parameters()])
    s = torch.randn(q, space.size, device=device)
    return model, TensorDataset(x, y), space, s


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a float32 square matrix product on this device."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def one(
    method: str, m: int, q: int, device: str, batch_size: int, naive_m: int, model_name: str
) -> dict:
    """Run one method in this process; time, scores checksum and peak memory."""
    model, data, space, s = model_and_data(m, q, device, model_name)
    # first use of torch.func imports torch._dynamo (~1.5 s): a once-per-process cost that the
    # pipeline pays before the pass anyway, so it is paid here before the clock starts
    torch.func.grad(lambda v: (v * v).sum())(torch.ones(2))
    if method == "naive":  # one backward per example; timed on naive_m examples, scaled to m
        subset = torch.utils.data.Subset(data, range(naive_m))
        start = time.perf_counter()
        scores = naive_scores(model, loss_fn, subset, space, s) * naive_m / m
        sync(device)
        seconds = (time.perf_counter() - start) * m / naive_m
        head = scores[:, :8]
    else:
        columns = {}
        start = time.perf_counter()
        result = score_pretraining(
            model,
            loss_fn,
            data,
            space,
            s,
            top_k=10,
            batch_size=batch_size or None,
            sink=lambda first, sc: columns.__setitem__(first, sc[:, :8]) if first == 0 else None,
        )
        sync(device)
        seconds = time.perf_counter() - start
        head = columns[0]
        assert result.path == "layers"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    out = {
        "method": method,
        "seconds": seconds,
        "peak_rss_mib": peak,
        "head": head.tolist(),
        "params": space.size,
    }
    if device == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def spawn(method: str, args, m: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--one",
        method,
        "--m",
        str(m),
        "--q",
        str(args.q),
        "--device",
        args.device,
        "--batch-size",
        str(args.batch_size),
        "--naive-m",
        str(args.naive_m or m),
        "--model",
        args.model,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="20000", help="pretraining examples (comma-separated)")
    parser.add_argument("--q", type=int, default=32, help="test-side vectors")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--batch-size", type=int, default=0, help="examples per batch (default: the pass's choice)"
    )
    parser.add_argument("--model", default="mlp", choices=["mlp", "passages"])
    parser.add_argument(
        "--naive-m",
        type=int,
        default=0,
        help="examples the naive loop really runs, its time scaled to m (default: all m)",
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(
            json.dumps(
                one(
                    args.one,
                    int(args.m),
                    args.q,
                    args.device,
                    args.batch_size,
                    min(args.naive_m, int(args.m)),
                    args.model,
                )
            )
        )
        return
    rate = matmul_rate(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"device {device_name}, torch threads {torch.get_num_threads()}, "
        f"float32 matmul rate {rate / 1e9:.1f} GFLOP/s"
    )
    for m in [int(v) for v in args.m.split(",")]:
        fast = spawn("fast", args, m)
        p = fast["params"]
        floor = 2 * args.q * m * p / rate
        print(f"{args.model}: m={m} Q={args.q} p={p}")
        print(
            f"  streaming pass : {fast['seconds']:8.2f} s   peak RSS {fast['peak_rss_mib']:.0f} "
            f"MiB"
            + (f", peak CUDA {fast['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in fast else "")
        )
        print(
            f"  floor 2*Q*m*p  : {floor:8.2f} s   pass / floor = {fast['seconds'] / floor:.2f}, "
            f"{m / fast['seconds']:,.0f} examples/s"
        )
        if not args.skip_naive:
            naive = spawn("naive", args, m)
            agree = torch.allclose(
                torch.tensor(fast["head"]), torch.tensor(naive["head"]), rtol=1e-3, atol=1e-7
            )
            print(
                f"  naive loop     : {naive['seconds']:8.2f} s   peak RSS "
                f"{naive['peak_rss_mib']:.0f} MiB (timed on {min(args.naive_m or m, m)} examples, "
                f"scaled to m)"
            )
            print(
                f"  speed-up naive / streaming = {naive['seconds'] / fast['seconds']:.1f}x; "
                f"first scores agree: {agree}"
            )


if __name__ == "__main__":
    main()
