"""The `msif` command line: precompute, validate, explore, demo (docs/design.md section 6)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_TASK = "digits"
DEFAULT_RUNS = Path("runs")
MAX_COUNT = 2**31 - 1  # as precompute.config.MAX_COUNT (not imported: that imports torch)


def _damping(text: str) -> float | str:
    """'auto' or a number; its range is checked by PrecomputeConfig.check."""
    return text if text == "auto" else _number(text)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _auto_or_whole(text: str) -> int | str:
    return text if text == "auto" else _whole(text)


def _at_least(low: int, high: int = MAX_COUNT):
    def parse(text: str) -> int:
        value = _whole(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {text!r}")
        return value

    return parse


_positive = _at_least(1)
_port = _at_least(1, 65535)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="msif",
        description="Trace finetuned predictions back to the pretraining examples that caused "
        "them (multi-stage influence functions).",
    )
    commands = main.add_subparsers(dest="command", required=True)

    pre = commands.add_parser("precompute", help="compute influence scores into a run directory")
    pre.add_argument(
        "--task", required=True, help="built-in name, package.module:Class or path/to/file.py:Class"
    )
    pre.add_argument("--out", required=True, type=Path, help="run directory to write")
    pre.add_argument("--scenarios", help="comma-separated: fixed,updated (default: the task's)")
    pre.add_argument("--solver", default="auto", choices=["auto", "exact", "cg", "pcg", "ekfac"])
    pre.add_argument(
        "--curvature",
        default="hessian",
        choices=["hessian", "ggn"],
        help="the matrix the solvers invert: the true Hessian (right at an exact optimum) or "
        "the Gauss-Newton matrix J^T H_loss J (positive semi-definite; for models trained by SGD)",
    )
    pre.add_argument(
        "--damping",
        default="auto",
        type=_damping,
        help="absolute damping d >= 0 added to every Hessian, or auto",
    )
    pre.add_argument("--top-k", default=20, type=_whole)
    pre.add_argument("--full-scores", default="auto", choices=["auto", "on", "off"])
    pre.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pre.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="where the pretraining pass runs: this process, or the Ray cluster at RAY_ADDRESS "
        "(a local Ray instance when unset)",
    )
    pre.add_argument(
        "--batch-size",
        default="auto",
        type=_auto_or_whole,
        help="examples per batch everywhere (auto: 256 for Hessian-vector products, larger "
        "for the pretraining pass, chosen for the device and model)",
    )
    pre.add_argument("--cg-tol", default=1e-6, type=_number, help="in (0, 1)")
    pre.add_argument(
        "--preconditioner",
        default="regulariser",
        choices=["regulariser", "ekfac"],
        help="pcg's preconditioner: the regulariser's diagonal plus the damping, or the EK-FAC "
        "inverse (fitted once per system)",
    )
    pre.add_argument("--cg-max-iter", default=500, type=_whole)
    pre.add_argument("--no-maps", action="store_true", help="skip the UMAP embedding map")
    pre.add_argument(
        "--map-layout",
        default="auto",
        choices=["auto", "seeded", "parallel"],
        help="UMAP layout: seeded (one thread, the same map every run), parallel (every core), "
        "auto (seeded on up to 4 cores, else parallel)",
    )
    pre.add_argument(
        "--agreement-tests",
        default=0,
        type=_whole,
        help="also score the first N tests with well-converged cg and record the agreement",
    )
    pre.add_argument(
        "--allow-unconverged",
        action="store_true",
        help="write the run even when a solve does not reach its tolerance for some tests",
    )
    pre.add_argument(
        "--overwrite", action="store_true", help="replace the msif run at --out (only an msif run)"
    )
    pre.add_argument(
        "--resume",
        action="store_true",
        help="continue a run at --out that was interrupted (crash, Ctrl+C, kill -9) from its "
        "finished stages and pass shards",
    )

    val = commands.add_parser("validate", help="compare scores with leave-one-out retraining")
    val.add_argument("--task", required=True)
    val.add_argument("--run", required=True, type=Path)
    val.add_argument("--n", default=10, type=_positive, help="pretraining examples to remove")
    val.add_argument("--tests", default=3, type=_positive, help="test examples to follow")
    val.add_argument("--seed", default=0, type=_at_least(0))

    exp = commands.add_parser("explore", help="open the explorer on a run or a folder of runs")
    exp.add_argument("target", type=Path)
    exp.add_argument("--port", type=_port)

    demo = commands.add_parser("demo", help="precompute the digits task if needed, then explore")
    demo.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="folder of runs")
    demo.add_argument("--port", type=_port)
    demo.add_argument("--no-browser", action="store_true", help="precompute only")
    return main


def run_precompute(args) -> Path:
    from precompute.outpath import check_out
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.task import load_task

    scenarios = args.scenarios
    config = PrecomputeConfig(
        scenarios=None if scenarios is None else tuple(s.strip() for s in scenarios.split(",")),
        solver=args.solver,
        damping=args.damping,
        curvature=args.curvature,
        top_k=args.top_k,
        full_scores=args.full_scores,
        device=args.device,
        batch_size=args.batch_size,
        cg_tol=args.cg_tol,
        cg_max_iter=args.cg_max_iter,
        preconditioner=args.preconditioner,
        maps=not args.no_maps,
        map_layout=args.map_layout,
        agreement_tests=args.agreement_tests,
        allow_unconverged=args.allow_unconverged,
        overwrite=args.overwrite,
        resume=args.resume,
        engine=args.engine,
    )
    config.check()  # every setting and the output folder before the task is even loaded
    check_out(args.out, args.overwrite)
    out = precompute(load_task(args.task), args.out, config, log=_log)
    print(f"msif: wrote {out}")
    return out


def run_validate(args) -> None:
    from precompute.task import load_task
    from precompute.validate import correlations, validate

    frame = validate(
        load_task(args.task), args.run, n=args.n, tests=args.tests, seed=args.seed, log=_log
    )
    with_pd = frame.sort_values(["scenario", "test_id", "predicted"])
    print(with_pd.to_string(index=False, float_format=lambda v: f"{v:+.3e}"))
    for scenario, group in [("all", frame), *frame.groupby("scenario")]:
        c = correlations(group)
        if c["pearson"] is None:
            print(f"{scenario}: {c['pairs']} pairs, too few for a correlation")
        else:
            print(
                f"{scenario}: {c['pairs']} pairs, Pearson {c['pearson']:.3f}, "
                f"Spearman {c['spearman']:.3f}, slope {c['slope']:.3f}"
            )
    print(f"msif: wrote {args.run / 'validation.parquet'}")


def run_demo(args) -> int:
    from precompute.outpath import msif_manifest
    from precompute.rundir import is_complete

    out = args.runs / DEFAULT_TASK
    if is_complete(out):
        print(f"msif: using the existing run {out}")
    else:
        # an msif run of another format is replaced; anything else at `out` is refused
        again = ["--overwrite"] if out.is_dir() and msif_manifest(out) is not None else []
        precompute_args = parser().parse_args(
            ["precompute", "--task", DEFAULT_TASK, "--out", str(out), *again]
        )
        run_precompute(precompute_args)
    if args.no_browser:
        return 0
    from explorer.launch import serve

    return serve(out, args.port)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from precompute.pipeline import StageError
    from precompute.rundir import RunError
    from precompute.task import TaskError

    args = parser().parse_args(argv)
    try:
        if args.command == "precompute":
            run_precompute(args)
        elif args.command == "validate":
            run_validate(args)
        elif args.command == "explore":
            from explorer.launch import serve

            return serve(args.target, args.port)
        elif args.command == "demo":
            return run_demo(args)
    except (TaskError, RunError, StageError, ValueError, FloatingPointError, OSError) as exc:
        if os.environ.get("MSIF_DEBUG"):
            raise
        hint = " (MSIF_DEBUG=1 shows the traceback)" if isinstance(exc, StageError) else ""
        print(f"msif: error: {exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msif: interrupted; no run was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
