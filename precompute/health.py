"""Checks that a solve or the pretraining pass produced numbers a run may be built on.

A run is never finished on vectors or scores that mean nothing: a solve that did not reach its
tolerance is an error (unless the user allows it, and then the affected tests are recorded), and
test-side vectors, s-vectors or scores that are non-finite or all zero are an error naming the
stage.
"""

from __future__ import annotations

import torch


class SolveError(ValueError):
    """A stage produced unusable numbers; one sentence naming the stage and what to do."""


def convergence(stage: str, hessian: str, info: dict, labels: list[str]) -> tuple[list[int], str]:
    """(rows that did not reach the solver's tolerance, a sentence describing the failure).

    `info` is a solver's info (precompute.curvature); `labels` names each row of the solve
    (e.g. "fixed test 3"), to count the affected tests per scenario.
    """
    rows = list(info.get("unconverged_rows") or [])
    if not rows:
        return [], ""
    counts: dict[str, int] = {}
    for row in rows:
        scenario = labels[row].split()[0]
        counts[scenario] = counts.get(scenario, 0) + 1
    split = ", ".join(f"{k} {v}" for k, v in counts.items())
    text = (
        f"stage {stage}: the {hessian} solve ({info['solver']}) did not reach its tolerance "
        f"{info['tolerance']:g} for {len(rows)} of {len(labels)} test vectors ({split}) within "
        f"{info['iterations']} iterations: relative residual up to "
        f"{info['max_relative_residual']:.3g}"
    )
    curvature = info.get("min_curvature")
    if info.get("negative_curvature_rows") and curvature is not None:
        text += (
            f", and it met negative curvature (down to {curvature:.3g} along a search "
            f"direction, damping included), so the damped Hessian is not positive definite: add "
            f"damping (--damping more than {info['damping'] - curvature:.3g}; the Hessian may "
            "curve down further still) or use --solver ekfac (a positive semi-definite "
            "approximation)"
        )
    else:
        text += (
            f"; raise --cg-max-iter (now {info['iterations']}) or --cg-tol, add damping "
            "(--damping), or use --solver ekfac"
        )
    return rows, text


def check_finite(stage: str, what: str, vectors: torch.Tensor, labels: list[str]) -> None:
    """SolveError when any row of `vectors` is non-finite or when every entry is zero."""
    bad = (~torch.isfinite(vectors)).any(1) if vectors.numel() else vectors.new_zeros(0).bool()
    if bad.any():
        first = labels[int(bad.nonzero()[0, 0])]
        raise SolveError(
            f"stage {stage}: the {what} are not finite for {int(bad.sum())} of {len(labels)} "
            f"tests (first: {first}); the Hessian may be singular: add damping (--damping)"
        )
    if vectors.numel() == 0 or not bool((vectors != 0).any()):
        raise SolveError(
            f"stage {stage}: the {what} are all zero, so every score would be zero; check the "
            "damping (--damping) and the losses"
        )


def check_scores(top, stage: str = "pretraining_pass") -> None:
    """SolveError when every score, as written (float32), is zero. The top lists hold the
    largest and smallest score of every test, so they show it exactly; non-finite scores have
    already stopped the pass (precompute.scoring)."""
    values = torch.cat([top.helpful_scores, top.harmful_scores], 1).float()
    if not bool(torch.isfinite(values).all()):
        raise SolveError(f"stage {stage}: some scores are not finite")
    if not bool((values != 0).any()):
        raise SolveError(
            f"stage {stage}: every score is zero in float32; the damping (--damping) may be "
            "so large that it swamps the Hessian"
        )


class Solves:
    """The solves of a run: their infos for the manifest, and the (scenario, test) pairs whose
    solve did not reach its tolerance (an error unless the run allows it)."""

    def __init__(self, scenarios: list[str], q: int, allow: bool, log):
        self.scenarios, self.q, self.allow, self.log = scenarios, q, allow, log
        self.info: dict[str, dict] = {}
        self.failed: set[tuple[str, int]] = set()

    def labels(self, scenarios: list[str]) -> list[str]:
        """What each row of a solve over `scenarios` (scenario-major) stands for."""
        return [f"{s} test {t}" for s in scenarios for t in range(self.q)]

    def add(self, stage: str, key: str, hessian: str, info: dict, scenarios: list[str]) -> None:
        info = dict(info)
        labels = self.labels(scenarios)
        rows, message = convergence(stage, hessian, info, labels)
        info.pop("unconverged_rows", None)
        self.info[key] = info
        if not rows:
            return
        if not self.allow:
            raise SolveError(f"{message}; or pass --allow-unconverged to write the run anyway")
        self.log(f"[msif] warning: {message}; writing the run anyway (--allow-unconverged)")
        self.failed.update((scenarios[r // self.q], r % self.q) for r in rows)

    def unconverged_tests(self) -> dict[str, list[int]]:
        return {
            s: sorted(t for scenario, t in self.failed if scenario == s)
            for s in self.scenarios
            if any(scenario == s for scenario, _ in self.failed)
        }
