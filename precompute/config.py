"""The settings of one `msif precompute` run, checked up front and written into the manifest."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

from precompute.curvature import CURVATURES, PRECONDITIONERS, SOLVERS
from precompute.task import SCENARIOS

ENGINES = ("local", "ray")
MAP_LAYOUTS = ("auto", "seeded", "parallel")  # --map-layout (precompute.maps.layout_threads)
MAX_COUNT = 2**31 - 1  # ranks and counts are stored as int32


@dataclass
class PrecomputeConfig:
    """Settings of one run; written into the manifest."""

    scenarios: tuple[str, ...] | None = None  # None: the task's own
    solver: str = "auto"
    damping: float | str = "auto"
    curvature: str = "hessian"  # hessian | ggn: the matrix every solve inverts
    preconditioner: str = "regulariser"  # regulariser | ekfac: pcg's M (precompute.curvature)
    top_k: int = 20
    full_scores: str = "auto"  # auto | on | off
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int | str = "auto"  # or examples per batch everywhere
    cg_tol: float = 1e-6
    cg_max_iter: int = 500
    maps: bool = True
    map_layout: str = "auto"  # auto | seeded | parallel (precompute.maps.layout_threads)
    overwrite: bool = False
    agreement_tests: int = 0  # > 0: compare the solver with well-converged cg on these tests
    allow_unconverged: bool = False  # write the run even when a solve misses its tolerance
    resume: bool = False  # continue an interrupted run at the same path from its checkpoints
    engine: str = "local"  # local | ray: where the pretraining pass runs
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """ValueError, one sentence naming the flag, for any setting out of its range."""
        _choice("--solver", self.solver, SOLVERS)
        _choice("--curvature", self.curvature, CURVATURES)
        _choice("--preconditioner", self.preconditioner, PRECONDITIONERS)
        _choice("--full-scores", self.full_scores, ("auto", "on", "off"))
        _choice("--device", self.device, ("auto", "cpu", "cuda"))
        _choice("--engine", self.engine, ENGINES)
        _choice("--map-layout", self.map_layout, MAP_LAYOUTS)
        if self.damping != "auto":
            _real("--damping", self.damping, "a finite number >= 0, or auto", lambda d: d >= 0)
        _real("--cg-tol", self.cg_tol, "a number in (0, 1)", lambda t: 0 < t < 1)
        _whole("--top-k", self.top_k, 1)
        if self.batch_size != "auto":
            _whole("--batch-size", self.batch_size, 1)
        _whole("--cg-max-iter", self.cg_max_iter, 1)
        _whole("--agreement-tests", self.agreement_tests, 0)
        for name in ("maps", "overwrite", "allow_unconverged", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.scenarios is not None:
            check_scenarios(self.scenarios)

    @property
    def objective_batch(self) -> int:
        """Examples per batch of Hessian-vector products, gradients and forwards: 256 unless
        --batch-size is given (a vmapped double backward holds many vectors per example)."""
        return 256 if self.batch_size == "auto" else int(self.batch_size)

    @property
    def pass_batch(self) -> int | None:
        """Examples per batch of the pretraining pass: None lets the pass choose."""
        return None if self.batch_size == "auto" else int(self.batch_size)


def check_scenarios(scenarios) -> None:
    if isinstance(scenarios, str) or not len(scenarios):
        raise ValueError(f"--scenarios must name at least one of fixed, updated, got {scenarios!r}")
    for s in scenarios:
        _choice("--scenarios", s, SCENARIOS)
    twice = sorted({s for s in scenarios if list(scenarios).count(s) > 1})
    if twice:
        raise ValueError(f"--scenarios names {', '.join(twice)} more than once")


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{flag} {value!r} is unknown: use {', '.join(choices)}")


def _real(flag: str, value, wanted: str, ok) -> None:
    fine = isinstance(value, Real) and not isinstance(value, bool)
    if not (fine and math.isfinite(value) and ok(value)):
        raise ValueError(f"{flag} must be {wanted}, got {value!r}")


def _whole(flag: str, value, low: int) -> None:
    fine = isinstance(value, Integral) and not isinstance(value, bool)
    if not (fine and low <= value <= MAX_COUNT):
        raise ValueError(f"{flag} must be a whole number in {low}..{MAX_COUNT}, got {value!r}")
