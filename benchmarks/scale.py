"""Benchmark: a whole `msif precompute` at scale on a synthetic task.

m pretraining examples of 32 features in 10 classes (Gaussian clusters), a 32-64-16 tanh
encoder (the shared W) with a 16 -> 10 pretraining head and a 16 -> 5 finetuning head, 2,000
finetuning examples, 50 tests, both scenarios, default solvers, maps included. The models are
trained briefly (Adam), as real ones are; `auto` then picks EK-FAC for the pretraining Hessian.
Prints every stage's time, the pass's examples per second, peak RSS and (on a GPU) peak CUDA
memory.

    python benchmarks/scale.py --m 1000000                 # CPU
    python benchmarks/scale.py --m 1000000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from precompute import MultiStageTask
from precompute.config import MAP_LAYOUTS
from precompute.pipeline import PrecomputeConfig, precompute

FEATURES, PRETRAIN_CLASSES, FINETUNE_CLASSES = 32, 10, 5


class Net(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(FEATURES, 64), nn.Tanh(), nn.Linear(64, 16), nn.Tanh()
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.encoder(x))


class ScaleTask(MultiStageTask):
    """Synthetic clusters; `m` pretraining examples (MSIF_SCALE_M for the command line)."""

    name = "scale"
    pretrain_l2 = 1e-3
    finetune_l2 = 1e-3
    proximal_alpha = 0.1

    def __init__(self, m: int | None = None, n: int = 2000, q: int = 50, seed: int = 0):
        import os

        m = m or int(os.environ.get("MSIF_SCALE_M", "100000"))
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(PRETRAIN_CLASSES, FEATURES, generator=g) * 2
        y = torch.randint(0, PRETRAIN_CLASSES, (m + n + q,), generator=g)
        x = centres[y] + torch.randn(m + n + q, FEATURES, generator=g)
        self.pre = TensorDataset(x[:m], y[:m])
        fine_y = y[m:] % FINETUNE_CLASSES
        self.train = TensorDataset(x[m : m + n], fine_y[:n])
        self.test = TensorDataset(x[m + n :], fine_y[n:])
        self._models: dict[str, nn.Module] = {}

    def pretrain_data(self):
        return self.pre

    def finetune_train_data(self):
        return self.train

    def finetune_test_data(self):
        return self.test

    def shared_parameters(self):
        return [f"encoder.{k}" for k, _ in Net(1).encoder.named_parameters()]

    def pretrain_loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    finetune_loss = pretrain_loss

    def finetune_logits(self, model, batch):
        return model(batch[0])

    def represent(self, model, batch):
        return model.encoder(batch[0])

    def describe(self, split, index):
        return self.describe_many(split, [index])[0]

    def describe_many(self, split, indices):
        labels = (self.pre if split == "pretrain" else self.test).tensors[1]
        chosen = labels[torch.as_tensor(list(indices), dtype=torch.long)].tolist()
        return {"label": chosen, "label_name": [f"class {c}" for c in chosen]}

    def _fit(self, model, data, steps, anchor=None):
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        x, y = data.tensors
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:20000]
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss = loss + 5e-4 * sum((p**2).sum() for p in model.parameters())
            if anchor is not None:
                loss = loss + 0.05 * sum(
                    ((p - a) ** 2).sum()
                    for p, a in zip(model.encoder.parameters(), anchor, strict=True)
                )
            loss.backward()
            opt.step()
        return model.eval()

    def pretrained_model(self):
        if "pretrained" not in self._models:
            torch.manual_seed(0)
            self._models["pretrained"] = self._fit(Net(PRETRAIN_CLASSES), self.pre, 300)
        return self._models["pretrained"]

    def finetuned_model(self, scenario):
        if scenario not in self._models:
            pretrained = self.pretrained_model()
            model = Net(FINETUNE_CLASSES)
            model.encoder.load_state_dict(pretrained.encoder.state_dict())
            anchor = [p.detach().clone() for p in pretrained.encoder.parameters()]
            if scenario == "fixed":
                model.encoder.requires_grad_(False)
                self._fit(model, self.train, 300)
                model.encoder.requires_grad_(True)
            else:
                self._fit(model, self.train, 300, anchor)
            self._models[scenario] = model
        return self._models[scenario]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1_000_000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-maps", action="store_true")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--map-layout", default="auto", choices=MAP_LAYOUTS)
    args = parser.parse_args()
    start = time.perf_counter()
    task = ScaleTask(args.m)
    task.finetuned_model("fixed"), task.finetuned_model("updated")
    print(f"data and training: {time.perf_counter() - start:.1f} s (not msif)")
    config = PrecomputeConfig(device=args.device, maps=not args.no_maps, map_layout=args.map_layout)
    if args.batch_size:
        config.batch_size = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = precompute(task, Path(tmp) / "run", config, log=lambda message: None)
        total = time.perf_counter() - start
        manifest = json.loads((run / "manifest.json").read_text())
    times = manifest["timings_s"]
    print(f"m={args.m:,}  device {manifest['device']}  solvers "
          f"{ {k: v['solver'] for k, v in manifest['solver'].items()} }")  # fmt: skip
    for stage, seconds in times.items():
        print(f"  {stage:<22} {seconds:8.2f} s")
    print(f"  {'whole precompute':<22} {total:8.2f} s")
    print(f"pass: {args.m / times['pretraining_pass']:,.0f} examples/s; map: {manifest['map']}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:,.0f} MiB (the data itself: {args.m * (FEATURES + 2) * 4 / 2**20:,.0f} "
          "MiB)")  # fmt: skip
    if args.device == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")
    np.set_printoptions()


if __name__ == "__main__":
    main()
