"""msif's solvers beside Kronfluence's EK-FAC and pyDVL's CG and LiSSA, on one problem.

A synthetic single-stage problem (msif's single-stage configuration: every parameter shared, U
and T empty, the FIXED scenario): a tanh MLP classifier trained on Gaussian inputs labelled by a
random teacher network, to a near-optimum of mean cross-entropy + (l2/2)|theta|^2 (Adam, then
full-batch L-BFGS). Every method scores every (query, training example) pair,
    score(z, t) = grad l_t . (H + lambda I)^{-1} grad l(z),     lambda = l2 + damping,
up to a positive factor, where H is the Hessian of the mean training loss (EK-FAC: its
Kronecker-factored Fisher approximation), or with `--curvature ggn` its Gauss-Newton matrix
G = (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i + l2 I (J_i the logits' Jacobian, p_i the
softmax), for models whose damped Hessian is indefinite: the medium model, not at an exact
optimum, has a Rayleigh quotient of -0.0031 in H + lambda I. Sizes:
- small:  20-64-64-5 MLP (5,829 parameters), 4,000 training examples, 32 queries; reference:
  the explicit float64 Hessian (torch.func.jacrev of the gradient, not msif's code) or GGN
  (the logits' per-example Jacobians, torch.func.jacrev) and a Cholesky solve;
- medium: 64-256-256-10 MLP (85,002 parameters), 50,000 training examples, 64 queries;
  reference: msif pcg in float64 at tolerance 1e-9, its residual re-checked with an
  independent product (torch.func.jvp of the gradient; for the GGN, torch.func.jvp and vjp of
  the logits).
msif's methods and the reference take the curvature given; Kronfluence's EK-FAC approximates
the true Fisher (for cross-entropy, the GGN) either way; pyDVL solves the Hessian only, and is
skipped under `--curvature ggn`.

Each method runs in its own process (`--worker`), in float32, and reports its fit time (the
curvature: EK-FAC factors; nothing for CG and LiSSA), its score time (test gradients, the
solves, the pass over the training set), its peak RSS, and Pearson and Spearman over all scores
and the mean top-10 overlap (helpful and harmful ends) against the reference.

Peers are optional (`pip install -e .[bench]`; pyDVL 0.10 declares numpy<2 but its torch
influence code runs with numpy 2: `pip install --no-deps pydvl==0.10.0` then `dask distributed
zarr numcodecs pyDeprecate more-itertools`). A missing peer is reported as skipped.

    python benchmarks/peers.py --sizes small
    python benchmarks/peers.py --sizes medium --curvature ggn \
        --methods msif-pcg,msif-ekfac,kronfluence-ekfac
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.task import MultiStageTask  # noqa: E402

SIZES = {
    "small": dict(
        inputs=20, hidden=64, classes=5, train=4000, queries=32, adam_epochs=40, lbfgs=1000
    ),
    "medium": dict(
        inputs=64, hidden=256, classes=10, train=50000, queries=64, adam_epochs=10, lbfgs=300
    ),
}
L2 = 1e-3  # the training objective's weight decay (msif: pretrain_l2)
DAMPING = 1e-3  # damping on top of it; every method solves with lambda = L2 + DAMPING
METHODS = (
    "msif-exact",
    "msif-cg",
    "msif-pcg",
    "msif-pcg-rows",
    "msif-ekfac",
    "kronfluence-ekfac",
    "pydvl-cg",
    "pydvl-lissa",
)
DEFAULT_METHODS = {
    "small": METHODS,
    "medium": ("msif-pcg", "msif-ekfac", "kronfluence-ekfac", "pydvl-lissa"),
}


# ---- the problem ----------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, inputs: int, hidden: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(inputs, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x):
        return self.net(x)


def make_problem(size: str, path: Path, seed: int = 0) -> None:
    """Data and a trained model, saved to `path` (reused when present)."""
    spec = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    n, q, d = spec["train"], spec["queries"], spec["inputs"]
    x = torch.randn(n + q, d, generator=g)
    torch.manual_seed(seed)
    teacher = MLP(d, 32, spec["classes"])
    with torch.no_grad():
        logits = 8 * teacher(x)
        noise = -torch.log(-torch.log(torch.rand(logits.shape, generator=g)))  # Gumbel
        y = (logits + noise).argmax(1)
    xt, yt, xq, yq = x[:n], y[:n], x[n:], y[n:]
    # trained in float64 to a near-optimum (the methods run on its float32 copy)
    model = MLP(d, spec["hidden"], spec["classes"]).double()
    x, xt, xq = x.double(), xt.double(), xq.double()

    def objective():
        reg = sum((p**2).sum() for p in model.parameters())
        return F.cross_entropy(model(xt), yt) + L2 / 2 * reg

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(spec["adam_epochs"]):
        for idx in torch.randperm(n, generator=g).split(256):
            opt.zero_grad()
            reg = sum((p**2).sum() for p in model.parameters())
            (F.cross_entropy(model(xt[idx]), yt[idx]) + L2 / 2 * reg).backward()
            opt.step()
    lbfgs = torch.optim.LBFGS(
        model.parameters(), max_iter=spec['lbfgs'], history_size=50, line_search_fn="strong_wolfe",
        tolerance_grad=1e-9, tolerance_change=1e-14,
    )  # fmt: skip

    def closure():
        lbfgs.zero_grad()
        value = objective()
        value.backward()
        return value

    lbfgs.step(closure)
    grad = torch.autograd.grad(objective(), list(model.parameters()))
    norm = torch.cat([t.reshape(-1) for t in grad]).norm().item()
    accuracy = (model(xq).argmax(1) == yq).float().mean().item()
    print(f"[{size}] trained: gradient norm {norm:.2e}, query accuracy {accuracy:.2f}")
    state = {k: v.float() for k, v in model.state_dict().items()}
    torch.save({"spec": spec, "state": state, "data": (xt.float(), yt, xq.float(), yq)}, path)


def load_problem(path: Path, dtype=torch.float32):
    saved = torch.load(path, weights_only=True)
    spec = saved["spec"]
    model = MLP(spec["inputs"], spec["hidden"], spec["classes"])
    model.load_state_dict(saved["state"])
    xt, yt, xq, yq = saved["data"]
    return model.to(dtype).eval(), xt.to(dtype), yt, xq.to(dtype), yq


class SingleStageTask(MultiStageTask):
    """The problem as an msif task in the single-stage configuration: every parameter shared
    (U and T empty), the finetuned model is the pretrained one, the FIXED scenario; its score
    is then (1/m) grad l_t . H^{-1} grad l(z), Koh & Liang's influence of removing z."""

    name = "peers-single-stage"
    scenarios = ("fixed",)
    pretrain_l2 = L2

    def __init__(self, model, xt, yt, xq, yq):
        self.model = model
        self.train = TensorDataset(xt, yt)
        self.test = TensorDataset(xq, yq)

    def pretrain_data(self):
        return self.train

    def finetune_train_data(self):
        return self.train  # unused: T is empty, nothing is finetuned

    def finetune_test_data(self):
        return self.test

    def pretrained_model(self):
        return self.model

    def finetuned_model(self, scenario):
        return self.model

    def shared_parameters(self):
        return [n for n, _ in self.model.named_parameters()]

    def pretrain_loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    finetune_loss = pretrain_loss

    def finetune_logits(self, model, batch):
        return model(batch[0])

    def represent(self, model, batch):
        return model.net[:4](batch[0])

    def describe(self, split, index):
        return {"label": None, "label_name": None, "text": None, "image": None}


# ---- msif ----------------------------------------------------------------------------------


def msif_scores(
    problem, solver: str, tol: float = 1e-6, dtype=torch.float32, rows_pcg=False,
    curvature: str = "hessian",
):  # fmt: skip
    """(scores [Q, m], seconds to the s-vectors, info) by msif's engine, single-stage
    configuration: test gradients u_t, s_t = (C + lambda I)^{-1} u_t (C the Hessian or the
    GGN), then the pass."""
    from precompute import curvature as solvers
    from precompute.curvature import SolveConfig
    from precompute.influence import Spaces, pretrain_vectors, scenario_vectors
    from precompute.objective import ParamSpace
    from precompute.scoring import score_pretraining

    model, xt, yt, xq, yq = load_problem(problem, dtype)
    task = SingleStageTask(model, xt, yt, xq, yq)
    spaces = Spaces(ParamSpace.of(model, task.shared_parameters()), ParamSpace.of(model, []))
    config = SolveConfig(solver, DAMPING, cg_tol=tol, cg_max_iter=2000, curvature=curvature)
    if rows_pcg:
        solvers.SOLVER_TABLE["pcg"] = _rows_pcg  # the measured alternative, see below
    start = time.perf_counter()
    u, _ = scenario_vectors(task, "fixed", model, spaces.shared, config, 256)
    s, info = pretrain_vectors(task, model, spaces, u, config, 256)
    solve_seconds = time.perf_counter() - start
    columns = {}
    score_pretraining(
        model, task.pretrain_loss, task.pretrain_data(), spaces.shared + spaces.pretrain_only,
        s, top_k=1, sink=lambda start, scores: columns.__setitem__(start, scores.double()),
    )  # fmt: skip
    scores = torch.cat([columns[k] for k in sorted(columns)], 1).numpy()
    return scores, solve_seconds, {k: v for k, v in info.items() if k in INFO_KEYS}


INFO_KEYS = (
    "iterations", "max_relative_residual", "min_curvature", "block_sizes", "damping", "curvature"
)  # fmt: skip


def _rows_pcg(objective, rhs, config):
    """PCG with the EK-FAC preconditioner, each row its own Krylov space (batched products):
    the alternative to msif's block PCG that this benchmark measures it against."""
    from precompute.curvature import solve_info
    from precompute.ekfac import EKFAC

    ekfac = EKFAC(objective).fit()
    d = float(config.damping)

    def damped(v):
        return objective.hvp(v) + d * v

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = ekfac.preconditioner(r, d)
    p = z.clone()
    rz = (r * z).sum(1)
    target = config.cg_tol * rhs.norm(dim=1)
    active = r.norm(dim=1) > target
    iterations = 0
    while active.any() and iterations < config.cg_max_iter:
        iterations += 1
        idx = active.nonzero().squeeze(1)
        ap = damped(p[idx])
        alpha = rz[idx] / (p[idx] * ap).sum(1)
        x[idx] += alpha[:, None] * p[idx]
        r[idx] -= alpha[:, None] * ap
        z_new = ekfac.preconditioner(r[idx], d)
        rz_new = (r[idx] * z_new).sum(1)
        p[idx] = z_new + (rz_new / rz[idx])[:, None] * p[idx]
        rz[idx] = rz_new
        active[idx] = r[idx].norm(dim=1) > target[idx]
    relative = (r.norm(dim=1) / rhs.norm(dim=1)).max().item()
    info = solve_info("pcg-rows", rhs.shape[1], d, None)
    info.update(iterations=iterations, max_relative_residual=relative, unconverged_rows=[])
    return x, info


# ---- peers ---------------------------------------------------------------------------------


def kronfluence_scores(problem, work: Path):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    model, xt, yt, xq, yq = load_problem(problem)
    task = Classification()
    model = prepare_model(model, task)
    analyzer = Analyzer("peers", model=model, task=task, cpu=True, output_dir=str(work))
    train, queries = TensorDataset(xt, yt), TensorDataset(xq, yq)
    start = time.perf_counter()
    analyzer.fit_all_factors(
        "ekfac", dataset=train, per_device_batch_size=512,
        factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True,
    )  # fmt: skip
    fit = time.perf_counter() - start
    analyzer.compute_pairwise_scores(
        "scores", factors_name="ekfac", query_dataset=queries, train_dataset=train,
        per_device_query_batch_size=len(queries), per_device_train_batch_size=512,
        score_args=ScoreArguments(damping_factor=L2 + DAMPING), overwrite_output_dir=True,
    )  # fmt: skip
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return scores.double().numpy(), fit, {}


def pydvl_scores(problem, method: str):
    from pydvl.influence.torch import CgInfluence, LissaInfluence
    from torch.utils.data import DataLoader

    model, xt, yt, xq, yq = load_problem(problem)
    loader = DataLoader(TensorDataset(xt, yt), batch_size=512)
    if method == "cg":
        influence = CgInfluence(
            model, F.cross_entropy, regularization=L2 + DAMPING, rtol=1e-6, atol=1e-10,
            maxiter=2000, solve_simultaneously=True,
        )  # fmt: skip
    else:  # LiSSA: scale must exceed the largest eigenvalue; 1000 iterations, as its default
        influence = LissaInfluence(
            model, F.cross_entropy, regularization=L2 + DAMPING, maxiter=1000, scale=10.0,
            rtol=1e-4,
        )  # fmt: skip
    start = time.perf_counter()
    influence = influence.fit(loader)
    fit = time.perf_counter() - start
    scores = influence.influences(xq, yq, xt, yt)
    return scores.detach().double().numpy(), fit, {}


# ---- the reference --------------------------------------------------------------------------


def flat_parameters(model):
    """(theta, params): the model's parameters as one flat vector, and theta -> the dict of
    named tensors that torch.func.functional_call takes."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def params(theta):
        out, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            out[name] = theta[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return out

    return theta, params


def flat_loss(model, xt, yt):
    """theta -> mean training loss + (l2/2)|theta|^2, with the model's parameters set to theta."""
    _, params = flat_parameters(model)

    def loss(theta):
        out = torch.func.functional_call(model, params(theta), (xt,))
        return F.cross_entropy(out, yt) + L2 / 2 * (theta @ theta)

    return loss


def per_example_gradients(model, x, y):
    theta, params = flat_parameters(model)

    def single(theta, xi, yi):
        return F.cross_entropy(
            torch.func.functional_call(model, params(theta), (xi[None],)), yi[None]
        )

    grad = torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))
    return torch.cat(
        [grad(theta, x[i : i + 2048], y[i : i + 2048]) for i in range(0, len(x), 2048)]
    )


def softmax_hessian(logits, v):
    """(diag p - p p^T) v per example: the Hessian of cross-entropy in the logits."""
    p = logits.softmax(-1)
    return p * v - p * (p * v).sum(-1, keepdim=True)


def explicit_ggn(model, x, chunk: int = 256):
    """(1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i + l2 I as a dense matrix, from the logits'
    per-example Jacobians J_i (torch.func.jacrev)."""
    theta, params = flat_parameters(model)

    def logits(theta, xi):
        return torch.func.functional_call(model, params(theta), (xi[None],))[0]

    jacobian = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))
    ggn = torch.zeros(len(theta), len(theta), dtype=theta.dtype)
    for i in range(0, len(x), chunk):
        j = jacobian(theta, x[i : i + chunk])  # [b, K, p]
        with torch.no_grad():
            out = model(x[i : i + chunk])
        p = out.softmax(-1)[:, :, None]
        hj = p * j - p * (p * j).sum(1, keepdim=True)  # (diag p - p p^T) J_i, [b, K, p]
        ggn += j.reshape(-1, len(theta)).T @ hj.reshape(-1, len(theta))
    ggn = ggn / len(x) + L2 * torch.eye(len(theta), dtype=theta.dtype)
    return (ggn + ggn.T) / 2


def curvature_product(model, xt, yt, curvature: str):
    """v -> C v for the training objective's Hessian (torch.func.jvp of its gradient) or GGN
    (torch.func.jvp and vjp of the logits), independent of msif's products."""
    theta, params = flat_parameters(model)
    if curvature == "hessian":
        grad = torch.func.grad(flat_loss(model, xt, yt))
        return lambda v: torch.func.jvp(grad, (theta,), (v,))[1]

    def logits(theta):
        return torch.func.functional_call(model, params(theta), (xt,))

    out, vjp = torch.func.vjp(logits, theta)

    def ggn(v):
        jv = torch.func.jvp(logits, (theta,), (v,))[1]
        return vjp(softmax_hessian(out, jv))[0] / len(xt) + L2 * v

    return ggn


def reference_scores(problem, size: str, curvature: str = "hessian"):
    """Float64 scores of the exactly solved damped system, and how it was checked."""
    model, xt, yt, xq, yq = load_problem(problem, torch.float64)
    theta, _ = flat_parameters(model)
    lam = DAMPING
    if size == "small":
        if curvature == "hessian":
            matrix = torch.func.jacrev(torch.func.grad(flat_loss(model, xt, yt)), chunk_size=128)(
                theta
            )
            matrix = (matrix + matrix.T) / 2
            how = "explicit float64 Hessian (jacrev of grad), Cholesky"
        else:
            matrix = explicit_ggn(model, xt)
            how = "explicit float64 GGN (jacrev of the logits), Cholesky"
        eig = torch.linalg.eigvalsh(matrix)
        system = matrix + lam * torch.eye(len(theta), dtype=theta.dtype)
        g_q = per_example_gradients(model, xq, yq)
        s = torch.cholesky_solve(g_q.T, torch.linalg.cholesky(system)).T
        check = {
            "how": how,
            "min_eigenvalue": eig[0].item(),
            "max_eigenvalue": eig[-1].item(),
            "mean_eigenvalue": eig.mean().item(),
        }
    else:
        s, info = _engine_vectors(problem, curvature)
        g_q = per_example_gradients(model, xq, yq)
        product = curvature_product(model, xt, yt, curvature)
        with torch.no_grad():
            residual = torch.stack([product(v) + lam * v for v in s]) - g_q
        check = {
            "how": f"msif pcg float64 tol 1e-9 on the {curvature}, residual re-checked by an "
            "independent product (torch.func)",
            "max_relative_residual": (residual.norm(dim=1) / g_q.norm(dim=1)).max().item(),
            **{k: v for k, v in info.items() if k in INFO_KEYS},
        }
    g_train = per_example_gradients(model, xt, yt)
    return (s @ g_train.T / len(xt)).numpy(), check


def _engine_vectors(problem, curvature: str):
    from precompute.curvature import SolveConfig
    from precompute.influence import Spaces, pretrain_vectors, scenario_vectors
    from precompute.objective import ParamSpace

    model, xt, yt, xq, yq = load_problem(problem, torch.float64)
    task = SingleStageTask(model, xt, yt, xq, yq)
    spaces = Spaces(ParamSpace.of(model, task.shared_parameters()), ParamSpace.of(model, []))
    config = SolveConfig("pcg", DAMPING, cg_tol=1e-9, cg_max_iter=2000, curvature=curvature)
    u, _ = scenario_vectors(task, "fixed", model, spaces.shared, config, 256)
    return pretrain_vectors(task, model, spaces, u, config, 256)


# ---- one method in this process -------------------------------------------------------------


def worker(method: str, size: str, problem: Path, out: Path) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    curvature = os.environ.get("BENCH_CURVATURE", "hessian")
    start = time.perf_counter()
    if method == "reference":
        scores, info = reference_scores(problem, size, curvature)
        fit = 0.0
    elif method.startswith("msif-"):
        solver = method.removeprefix("msif-")
        rows = solver == "pcg-rows"
        tol = float(os.environ.get("BENCH_TOL", "1e-6"))
        scores, fit, info = msif_scores(
            problem, "pcg" if rows else solver, tol, rows_pcg=rows, curvature=curvature
        )
    elif method == "kronfluence-ekfac":
        with tempfile.TemporaryDirectory() as work:
            scores, fit, info = kronfluence_scores(problem, Path(work))
    elif method.startswith("pydvl-"):
        if curvature != "hessian":
            raise SystemExit(f"{method} solves the Hessian only (--curvature {curvature})")
        scores, fit, info = pydvl_scores(problem, method.removeprefix("pydvl-"))
    else:
        raise SystemExit(f"unknown method {method}")
    total = time.perf_counter() - start
    np.save(out.with_suffix(".npy"), scores)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    record = {"method": method, "fit_s": fit, "score_s": total - fit, "total_s": total,
              "peak_rss_mib": rss, "info": info}  # fmt: skip
    out.write_text(json.dumps(record, default=float))


# ---- the driver -----------------------------------------------------------------------------


def agreement(scores: np.ndarray, reference: np.ndarray) -> dict:
    from scipy import stats

    from precompute.agreement import top_overlap

    a, b = scores.reshape(-1), reference.reshape(-1)
    return {
        "pearson": float(np.corrcoef(a, b)[0, 1]),
        "spearman": float(stats.spearmanr(a, b)[0]),
        "top10": top_overlap(scores, reference),
    }


def run(method: str, size: str, problem: Path, work: Path, timeout: float) -> dict:
    out = work / f"{size}-{method}{_suffix()}.json"
    command = [sys.executable, __file__, "--worker", method, "--size", size,
               "--problem", str(problem), "--out", str(out)]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        skipped = "ModuleNotFoundError" in done.stderr or "solves the Hessian only" in last
        return {"method": method, "error": ("skipped: " if skipped else "") + last}
    return json.loads(out.read_text())


def _suffix() -> str:
    """The result files' suffix for the curvature: none for the Hessian, "-ggn" for the GGN."""
    curvature = os.environ.get("BENCH_CURVATURE", "hessian")
    return "" if curvature == "hessian" else f"-{curvature}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small")
    parser.add_argument("--methods", help="comma-separated (default: per size)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "msif-peers")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per method")
    parser.add_argument("--tol", type=float, default=1e-6, help="msif cg/pcg tolerance")
    parser.add_argument("--curvature", choices=("hessian", "ggn"), default="hessian",
                        help="the matrix msif's methods and the reference invert")  # fmt: skip
    parser.add_argument("--no-reference", action="store_true", help="times only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--problem", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.size, args.problem, args.out)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_TOL"] = str(args.tol)
    os.environ["BENCH_CURVATURE"] = args.curvature
    for size in args.sizes.split(","):
        problem = args.work / f"{size}.pt"
        if not problem.is_file():
            make_problem(size, problem)
        methods = args.methods.split(",") if args.methods else DEFAULT_METHODS[size]
        reference_file = args.work / f"{size}-reference{_suffix()}.npy"
        if not reference_file.is_file() and not args.no_reference:
            record = run("reference", size, problem, args.work, args.timeout)
            print(f"[{size}] reference: {json.dumps(record, default=float)}", flush=True)
        reference = np.load(reference_file) if reference_file.is_file() else None
        spec = SIZES[size]
        print(f"[{size}] {spec['train']:,} training examples, {spec['queries']} queries, "
              f"lambda = {L2 + DAMPING:g}, curvature {args.curvature}", flush=True)  # fmt: skip
        print(f"{'method':<18} {'fit s':>8} {'score s':>8} {'total s':>8} {'RSS MiB':>8} "
              f"{'Pearson':>8} {'Spearman':>8} {'top-10':>7}  info", flush=True)  # fmt: skip
        for method in methods:
            record = run(method, size, problem, args.work, args.timeout)
            if "error" in record:
                print(f"{method:<18} {record['error']}", flush=True)
                continue
            scores = np.load(args.work / f"{size}-{method}{_suffix()}.npy")
            nan = float("nan")
            a = (
                agreement(scores, reference)
                if reference is not None
                else dict.fromkeys(("pearson", "spearman", "top10"), nan)
            )
            print(
                f"{method:<18} {record['fit_s']:8.2f} {record['score_s']:8.2f} "
                f"{record['total_s']:8.2f} {record['peak_rss_mib']:8.0f} {a['pearson']:8.4f} "
                f"{a['spearman']:8.4f} {a['top10']:7.3f}  {json.dumps(record['info'])}",
                flush=True,
            )


if __name__ == "__main__":
    main()
