"""What the explorer may be pointed at: one run directory, or a folder holding runs.

Free of streamlit, so `msif explore` can check its target in the terminal before it starts a
server (importing the cached readers of explorer.data outside a server logs warnings).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from precompute.rundir import RunError, check_ids, read_manifest

REQUIRED_TABLES = ("pretrain", "test", "predictions", "top")


def app_target() -> Path | None:
    """What the served app shows: the run (or folder of runs) named by MSIF_RUN or the first
    script argument (explorer/launch.py sets MSIF_RUN)."""
    value = os.environ.get("MSIF_RUN") or (sys.argv[1] if len(sys.argv) > 1 else None)
    return Path(value).expanduser() if value else None


def looks_like_run(path: Path) -> bool:
    """A folder meant as one run (it holds a manifest or any of the run tables)."""
    return (path / "manifest.json").exists() or any(
        (path / f"{name}.parquet").exists() for name in REQUIRED_TABLES
    )


def find_runs(root: Path) -> list[Path]:
    """Runs (finished or not) directly inside `root`; hidden temporary folders are skipped."""
    if not root.is_dir():
        return []
    children = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return [p for p in children if looks_like_run(p)]


def target_problem(target: Path) -> str | None:
    """Why the explorer cannot open `target`, as one sentence, or None when it is a run that
    reads (manifest, tables and ids) or a folder holding runs (each checked when picked)."""
    target = Path(target)
    try:
        if not target.exists():
            return f"{target} does not exist"
        if not target.is_dir():
            return f"{target} is not a folder: give a run directory or a folder of runs"
        if not looks_like_run(target):
            if find_runs(target):
                return None
            return (
                f"{target} holds no msif run: a run directory has a manifest.json (make one "
                "with msif precompute --task digits --out RUN_DIR)"
            )
        manifest = read_manifest(target)
        missing = [f"{t}.parquet" for t in REQUIRED_TABLES]
        missing = [name for name in missing if not (target / name).is_file()]
        if missing:
            return f"{target} is missing {', '.join(missing)}"
        check_ids(target, manifest=manifest)
    except RunError as exc:
        return str(exc) if str(target) in str(exc) else f"{target}: {exc}"
    except OSError as exc:  # e.g. a folder that may not be read
        return f"{target} cannot be read ({exc.strerror or exc})"
    return None
