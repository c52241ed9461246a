"""The pretraining pass and the pretraining Hessian's solve on a Ray cluster (`--engine ray`).

The pass is a sum over pretraining examples, so it shards: Ray actors, one per worker CPU (or
GPU with `--device cuda`), each hold the pretrained model, the loss and the s-vectors, put once
into the object store and deserialised once per actor, and run the same unit of work as the
local engine (precompute.scoring.PretrainingPass) on one shard of the pretraining set at a time.
The driver ships each shard's batches, merges the partial top lists (TopK.merge is exact) and
receives each shard's scores for scores.parquet. A shard is idempotent: when an actor dies, a
new one is started and the shard runs again, and the driver takes each shard's result once, so
nothing is lost or counted twice. Finished shards go to the run's ShardStore, so `--resume`
continues after a failed job.

The solve's passes over the pretraining data shard the same way (`RayCurvature`): every
curvature product (Hessian or Gauss-Newton, for cg, pcg, exact and the damping's trace estimate)
and each of EK-FAC's statistics passes (factors, eigenvalue corrections, diagonal) is a sum over
examples, computed per shard by actors holding the objective and summed by the driver; the
solver itself (its few [Q, p] vectors) stays on the driver. Both kinds of actors run in a
`WorkerPool`, which reruns a shard whose actor died on a new actor.

The cluster is the one at RAY_ADDRESS (e.g. `ray start --head` then
RAY_ADDRESS=127.0.0.1:6379); without it, a local Ray instance is started for the run and
stopped after it.
"""

from __future__ import annotations

import copy
import importlib.machinery
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import Dataset

from precompute.objective import LossFn, ParamSpace, batches, ordered_sum
from precompute.scoring import (
    PassResult,
    PretrainingPass,
    ShardStore,
    Sink,
    TopK,
    finished,
    score_batches,
    shards,
)

MAX_RETRIES = 3  # new workers tried on a shard whose worker died


class EngineError(ValueError):
    """The Ray engine cannot run; one sentence."""


class ShardWorker:
    """A Ray actor: the unit of work built once from the shared payload, run on shards."""

    def __init__(self, payload: dict):
        torch.set_num_threads(max(1, int(payload["threads"])))
        device = torch.device(payload["device"])
        self.model = payload["model"].to(device).eval()
        self.unit = PretrainingPass(
            self.model, payload["loss_fn"], payload["space"], payload["s"].to(device),
            payload["m"],
        )  # fmt: skip
        self.top_k, self.device, self.full = payload["top_k"], device, payload["full"]
        self.dataset, self.batch_size = payload["dataset"], payload["batch_size"]

    def run(self, start: int, stop: int, shard_batches: list | None) -> tuple:
        """(start, the shard's top lists as plain tensors, its scores [Q, n] or None, path).

        The shard's batches come from the driver, or, for a dataset the workers read
        themselves (precompute.parquet_data), from this worker's copy of the dataset.
        """
        from precompute.objective import to_device

        columns = []
        sink = (lambda first, scores: columns.append(scores.float().cpu())) if self.full else None
        if shard_batches is None:
            stream = batches(self.dataset, self.batch_size, self.device, within=range(start, stop))
        else:
            stream = (to_device(b, self.device) for b in shard_batches)
        top = score_batches(self.unit, stream, start, self.top_k, sink)
        scores = torch.cat(columns, 1).numpy() if self.full else None
        c = self.unit.contraction
        path = (c.use_layers, c.layer_params, list(c.vmap_space.names))
        return start, top.state(), scores, path

    def pid(self) -> int:
        return os.getpid()


def token_auth() -> None:
    """Before Ray is first imported: a cluster at RAY_ADDRESS is reached with Ray's token
    authentication when a token is at hand and RAY_AUTH_MODE is unset. `ray start --head`
    (Ray >= 2.59) enables tokens and writes ~/.ray/auth_token, while clients default to
    RAY_AUTH_MODE=disabled and are refused; a token-mode client also reaches a cluster without
    authentication. Ray reads the mode when it is imported."""
    if "ray" in sys.modules or not os.environ.get("RAY_ADDRESS") or "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


def preflight() -> None:
    """Before any work: Ray is installed and RAY_ADDRESS, when set, answers (EngineError)."""
    token_auth()
    try:
        import ray  # noqa: F401
    except ImportError:
        raise EngineError(
            "--engine ray needs Ray: install it with pip install 'msif[ray]'"
        ) from None
    _probe(os.environ.get("RAY_ADDRESS") or None)


class RayCluster:
    """A connection to the cluster at RAY_ADDRESS, or a local instance started for the run
    (and stopped when the run ends; a cluster msif did not start is only disconnected)."""

    def __init__(self, log=print):
        token_auth()
        try:
            import ray
        except ImportError:
            raise EngineError(
                "--engine ray needs Ray: install it with pip install 'msif[ray]'"
            ) from None
        self.ray, self.log = ray, log
        self.address = os.environ.get("RAY_ADDRESS") or None
        self.started = False

    def __enter__(self) -> RayCluster:
        ray = self.ray
        if not ray.is_initialized():
            _probe(self.address)
            env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            try:
                ray.init(
                    address=self.address or "local",
                    runtime_env={"env_vars": env},
                    log_to_driver=False,
                    include_dashboard=False,
                    logging_level=logging.ERROR,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EngineError(
                    f"cannot reach the Ray cluster at RAY_ADDRESS={self.address} ({exc})"
                ) from exc
            self.started = True
        resources = ray.cluster_resources()
        self.cpus, self.gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        where = self.address or "a local instance"
        self.log(f"[msif] Ray cluster at {where}: {self.cpus} CPUs, {self.gpus} GPUs")
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()

    def workers(self, device: str) -> int:
        """Actors to run: one per GPU with `--device cuda`, else one per CPU."""
        if device == "cuda" and not self.gpus:
            raise EngineError("--device cuda was asked for but the Ray cluster has no GPUs")
        return max(1, self.gpus if device == "cuda" else self.cpus)


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on a RAY_ADDRESS (host:port) where nothing listens (ray.init would retry for
    minutes)."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"nothing answers at RAY_ADDRESS={address} ({exc}); start a head with "
            "`ray start --head` or unset RAY_ADDRESS for a local Ray instance"
        ) from None


def _ship_task_code(loss_fn) -> None:
    """A task loaded from a file (path/to/file.py:Class) is not importable by its module name
    on the workers: its module travels by value with the loss function."""
    name = getattr(loss_fn, "__module__", "") or ""
    module = sys.modules.get(name)
    if module is None or name == "__main__":
        return
    # importable by name from the path (not only present in this process's sys.modules, as a
    # module loaded from a file under a name of msif's own is)
    importable = importlib.machinery.PathFinder.find_spec(name.split(".")[0], sys.path)
    if importable is None:
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(module)


class WorkerPool:
    """Ray actors of one class, each built once from one payload (put once in the object
    store). `map` runs one call per shard on the free actors; a shard whose actor died runs
    again on a new actor (up to MAX_RETRIES times), and each shard's result is taken once."""

    def __init__(self, cluster: RayCluster, cls: type, payload: dict, workers: int, **options):
        self.ray, self.log = cluster.ray, cluster.log
        self.actor = self.ray.remote(cls).options(**options)
        self.payload = self.ray.put(payload)
        self.actors = [self.actor.remote(self.payload) for _ in range(workers)]

    def map(self, parts: list[range], call: Callable) -> Iterator[tuple[range, object]]:
        """(shard, result) for every shard of `parts` as it finishes; call(actor, shard) submits
        the shard's work and returns its object ref."""
        ray = self.ray
        queue, idle = list(parts), list(self.actors)
        pending: dict = {}
        retries: dict[int, int] = {}

        def submit(actor) -> None:
            shard = queue.pop(0)
            pending[call(actor, shard)] = (actor, shard)

        while queue and idle:
            submit(idle.pop())
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, shard = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:  # died: a new actor runs the shard
                if "creation task" in str(exc):  # it never started: no retry will start it
                    raise EngineError(f"the Ray workers could not start: {_cause(exc)}") from None
                retries[shard.start] = retries.get(shard.start, 0) + 1
                if retries[shard.start] > MAX_RETRIES:
                    raise EngineError(
                        f"the Ray workers died {MAX_RETRIES + 1} times on pretraining examples "
                        f"{shard.start}..{shard.stop - 1}"
                    ) from None
                self.log(f"[msif] a Ray worker died; retrying examples {shard.start}..")
                self.actors.remove(actor)
                actor = self.actor.remote(self.payload)
                self.actors.append(actor)
                queue.insert(0, shard)
                submit(actor)
                continue
            if queue:
                submit(actor)
            yield shard, result

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


class CurvatureWorker:
    """A Ray actor holding the pretraining objective (precompute.objective.Objective, rebuilt
    from the payload): curvature products and EK-FAC statistics summed over one shard."""

    def __init__(self, payload: dict):
        from precompute.objective import Objective

        torch.set_num_threads(max(1, int(payload["threads"])))
        device = torch.device(payload["device"])
        model = payload["model"].to(device).eval()
        self.objective = Objective(
            model, payload["loss_fn"], payload["dataset"], payload["space"], payload["reg"],
            payload["batch_size"], curvature=payload["curvature"], split=payload["split"],
        )  # fmt: skip
        self.fitters: dict = {}

    def curvature_sum(
        self, vectors: torch.Tensor, start: int, stop: int, size: int
    ) -> torch.Tensor:
        """sum over examples start..stop-1, in batches of `size`, of the curvature times each
        row of vectors."""
        device = self.objective.device
        within = range(start, stop)
        return self.objective.curvature_sum(vectors.to(device), within, size).cpu()

    def ekfac(self, fisher: str, step: str, state, start: int, stop: int, size: int) -> list:
        """EKFAC.partial of examples start..stop-1 in batches of `size` (one EK-FAC fitter per
        Fisher kind)."""
        from precompute.ekfac import EKFAC

        if fisher not in self.fitters:
            self.fitters[fisher] = EKFAC(self.objective, fisher=fisher)
        self.fitters[fisher].batch_size = size
        device = self.objective.device
        state = tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, state)
        out = self.fitters[fisher].partial(step, state, range(start, stop))
        return tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, out)


class RayCurvature:
    """The pretraining objective's data sums on the cluster: entered, it attaches itself as
    `objective.sharded`, so `Objective.data_curvature` and `EKFAC.fit` take the sums of their
    blocks of examples (precompute.objective.sum_blocks) from the workers and add them in the
    order this process would (so the local engine's s-vectors, bit for bit where the workers'
    kernels round as the driver's do; a float32 matrix product may round differently with
    another thread count); left, it detaches and stops its actors."""

    def __init__(self, cluster: RayCluster, objective, device: str):
        self.cluster, self.objective, self.device = cluster, objective, device
        self.workers = cluster.workers(device)
        self.pool: WorkerPool | None = None

    def __enter__(self) -> RayCurvature:
        o = self.objective
        _ship_task_code(getattr(o.loss_fn, "__func__", o.loss_fn))
        payload = {
            "model": _cpu_copy(o.model), "loss_fn": o.loss_fn, "dataset": o.dataset,
            "space": o.space, "reg": o.reg.cpu(), "batch_size": o.batch_size,
            "curvature": o.curvature, "split": o.split, "device": self.device, "threads": 1,
        }  # fmt: skip
        options = {"num_gpus": 1, "num_cpus": 1} if self.device == "cuda" else {"num_cpus": 1}
        self.pool = WorkerPool(self.cluster, CurvatureWorker, payload, self.workers, **options)
        o.sharded = self
        return self

    def __exit__(self, *exc) -> None:
        self.objective.sharded = None
        if self.pool is not None:
            self.pool.close()

    def describe(self) -> dict:
        return {"engine": "ray", "workers": self.workers, "worker_device": self.device}

    def curvature_sum(self, vectors: torch.Tensor, blocks: list[range], size: int) -> torch.Tensor:
        """The sum over every example of the curvature times each row of vectors: each block's
        sum (batches of `size`) on a worker, the blocks' sums added in order."""
        ref = self.cluster.ray.put(vectors.detach().cpu())
        total = self._in_order(
            blocks, lambda actor, b: actor.curvature_sum.remote(ref, b.start, b.stop, size)
        )
        return total.to(vectors)

    def ekfac_sum(self, fisher: str, step: str, state, blocks: list[range], size: int) -> list:
        """EKFAC.partial of every block (batches of `size`) on the workers, added in order (on
        the driver's device)."""
        ref = self.cluster.ray.put(tree_map(_cpu, state))
        total = self._in_order(
            blocks, lambda actor, b: actor.ekfac.remote(fisher, step, ref, b.start, b.stop, size)
        )
        device = self.objective.device
        return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, total)

    def _in_order(self, blocks: list[range], call: Callable):
        """ordered_sum of the blocks' results, added in block order as they arrive (a block
        finished early waits for the ones before it), so the driver holds few at a time."""
        position = {b.start: i for i, b in enumerate(blocks)}
        waiting: dict[int, object] = {}
        total, following = None, 0
        for block, result in self.pool.map(blocks, call):
            waiting[position[block.start]] = result
            while following in waiting:
                total = ordered_sum([total, waiting.pop(following)])
                following += 1
        return total


def _cause(exc: Exception) -> str:
    """The innermost 'SomeError: message' line of a Ray error's text, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return causes[-1] if causes else lines[0]


def _cpu(x):
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def ray_pass(
    model: torch.nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    space: ParamSpace,
    s: torch.Tensor,
    top_k: int,
    batch_size: int | None,
    sink: Sink | None,
    progress: Callable[[int], None] | None,
    shard_size: Callable[[int], int],
    store: ShardStore | None,
    cluster: RayCluster,
) -> tuple[PassResult, dict]:
    """The pass over `dataset` on the cluster: (the same PassResult as the local engine, the
    engine's description for the manifest: workers and their devices)."""
    ray = cluster.ray
    m = len(dataset)
    device = s.device.type
    local = PretrainingPass(model, loss_fn, space, s, m)  # for its choices only
    batch_size = batch_size or local.auto_batch_size()
    workers = cluster.workers(device)
    _ship_task_code(getattr(loss_fn, "__func__", loss_fn))
    workers_read = bool(getattr(dataset, "read_on_workers", False))
    payload = {
        "model": _cpu_copy(model), "loss_fn": loss_fn, "space": space, "s": s.cpu(), "m": m,
        "device": device, "top_k": top_k, "full": sink is not None, "threads": 1,
        "dataset": dataset if workers_read else None, "batch_size": batch_size,
    }  # fmt: skip
    options = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": 1}
    top, path = TopK(top_k), None
    todo = []
    parts = shards(m, shard_size(batch_size))
    done = finished(store, parts, progress)
    for shard in parts:
        if shard.start in done:
            top.merge(done[shard.start])
        else:
            todo.append(shard)

    def run(actor, shard):
        shipped = None
        if not workers_read:
            stream = batches(dataset, batch_size, torch.device("cpu"), within=shard)
            shipped = ray.put([tree_map(_own, batch) for batch in stream])
        return actor.run.remote(shard.start, shard.stop, shipped)

    pool = WorkerPool(cluster, ShardWorker, payload, workers, **options)
    try:
        for shard, (start, state, scores, layout) in pool.map(todo, run):
            path = layout  # how the workers scored: the same for every shard
            part = TopK.from_state(top_k, state)
            if sink is not None:
                sink(start, torch.from_numpy(scores.copy()))  # the store's copy is read-only
            if store is not None:
                store.save(shard, part)
            top.merge(part)
            if progress is not None:
                progress(len(shard))
    finally:
        pool.close()
    if path is None:  # every shard came from the store
        c = local.contraction
        path = (c.use_layers, c.layer_params, list(c.vmap_space.names))
    layers, layer_params, vmap_params = path
    result = PassResult(
        top=top,
        path="layers" if layers else "vmap",
        layer_params=layer_params if layers else [],
        vmap_params=vmap_params if layers else list(space.names),
    )
    engine = {
        "engine": "ray",
        "address": cluster.address or "local",
        "workers": workers,
        "worker_device": device,
        "shards": len(todo),
        "data": "read by the workers" if workers_read else "shipped by the driver",
        "ray": ray.__version__,
    }
    return result, engine


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).cpu()


def _own(x):
    """A batch's tensor as its own storage: a slice of the dataset's tensor would otherwise
    carry the whole dataset's storage into the object store."""
    return x.clone() if isinstance(x, torch.Tensor) else x
