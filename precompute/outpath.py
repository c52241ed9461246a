"""Where msif may write a run, and msif's own temporary folders beside it.

The rule (nothing a user owns is ever deleted): msif writes a run only into a folder that does
not exist yet, or, with `--overwrite`, over a folder that holds an msif run and nothing else
(every entry is a file msif wrote there). Anything else is refused with one sentence before any
work starts: a folder of the user's files, a git clone, a folder of runs, an empty folder, a
file, a symbolic link, a mount point, the working directory or one of its ancestors.

A run is written into a hidden sibling `.NAME.tmp-XXXXXXXX` that holds a marker file locked
(flock) by the writing process for its whole life. A temporary folder whose marker names the
same run and whose lock can be taken was left by a process that died (even by `kill -9`): it is
stale and removed when another run at that path starts or finishes, unless that run resumes it
(`--resume`). So are `.NAME.old-XXXXXXXX` folders (a replaced run being deleted) that hold an
msif manifest. Nothing else is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so no temporary folder can be proven stale
    fcntl = None

MANIFEST = "manifest.json"
MARKER = ".msif-writer.json"
# files an msif run holds (runs written before the manifest listed its files)
RUN_FILES = frozenset(
    {
        MANIFEST,
        "pretrain.parquet",
        "test.parquet",
        "predictions.parquet",
        "top.parquet",
        "scores.parquet",
        "validation.parquet",
        ".validation.parquet.tmp",  # `msif validate` killed between write and rename
        ".manifest.json.tmp",
    }
)


class OutPathError(ValueError):
    """`--out` names a place msif must not write to; one sentence."""


def msif_manifest(folder: Path) -> dict | None:
    """The manifest in `folder` when msif wrote it (of any schema version), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if manifest.get("generator") == "msif":
        return manifest
    # runs written before the manifest named its generator
    keys = ("schema_version", "task", "counts", "complete")
    return manifest if all(k in manifest for k in keys) else None


def _listing(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def entries(folder: Path) -> list[str]:
    """The names in `folder`, a folder's with a trailing "/" (as the manifest lists them)."""
    try:
        return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError as exc:
        raise OutPathError(f"--out {folder}: msif cannot read it ({exc.strerror})") from exc


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse, with one sentence (OutPathError), any `out` msif must not write; see the module
    docstring for the rule. Touches nothing."""
    out = Path(out).expanduser()
    flag = " with --overwrite" if overwrite else ""
    here = Path.cwd().resolve()
    if out.is_symlink():
        raise OutPathError(f"--out {out} is a symbolic link; give a new folder's real path")
    if not out.exists():
        _check_parent(out)
        return
    real = out.resolve()
    if not real.is_dir():
        raise OutPathError(f"--out {out} exists and is not a folder; give a new folder's path")
    if real == here or real in here.parents:
        raise OutPathError(
            f"--out {out} is the working directory or one of its parents; msif writes a run "
            "into a new folder of its own"
        )
    if os.path.ismount(real):
        raise OutPathError(f"--out {out} is a mount point; give a new folder inside it")
    manifest = msif_manifest(real)
    if manifest is None:
        names = entries(real)
        holds = f"holds {_listing(names)}" if names else "is an empty folder"
        raise OutPathError(
            f"--out {out} already exists and is not an msif run (it {holds}); msif writes only "
            "into a new folder, or over an msif run with --overwrite, so nothing of yours is "
            "replaced: choose a new path"
        )
    if not overwrite:
        raise OutPathError(f"--out {out} already holds an msif run; pass --overwrite to replace it")
    owned = set(manifest.get("files") or ()) | RUN_FILES
    foreign = [e for e in entries(real) if e not in owned]
    if foreign:
        raise OutPathError(
            f"--out {out} holds an msif run and also {_listing(foreign)}, which msif did not "
            f"write; move them out or choose a new path (refused{flag}, nothing was changed)"
        )


def _check_parent(out: Path) -> None:
    """The folder `out` will be made in must be a writable folder (or makeable in one)."""
    parent = out.absolute().parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link on the way
            raise OutPathError(f"--out {out}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise OutPathError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutPathError(f"--out {out}: msif cannot write into {parent} (permission denied)")


# ---- temporary folders ------------------------------------------------------------------------


def temporary_name(out: Path, kind: str, tag: str) -> Path:
    """The hidden sibling `.NAME.<kind>-<tag>` of `out` (kind "tmp" or "old")."""
    return out.parent / f".{out.name}.{kind}-{tag}"


class Claim:
    """The marker of a temporary folder, locked while its writing process lives."""

    def __init__(self, folder: Path, target: Path):
        self.path = folder / MARKER
        self.handle = open(self.path, "w")  # noqa: SIM115 (held open: the lock lives with it)
        if fcntl is not None:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        info = {"target": target.name, "pid": os.getpid(), "host": socket.gethostname()}
        self.handle.write(json.dumps(info))
        self.handle.flush()

    def release(self) -> None:
        self.handle.close()  # closing drops the lock


def _abandoned(folder: Path, target: Path) -> bool:
    """True when `folder` is an msif temporary folder for `target` whose writer is gone."""
    marker = folder / MARKER
    if fcntl is None:
        return False
    try:
        with open(marker) as handle:
            if json.loads(handle.read() or "{}").get("target") != target.name:
                return False
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: nobody holds it
            return True
    except (OSError, ValueError, AttributeError):
        return False


def _siblings(out: Path, kind: str) -> list[Path]:
    parent = out.absolute().parent
    if not parent.is_dir():
        return []
    prefix = f".{out.name}.{kind}-"
    return [
        p
        for p in sorted(parent.iterdir())
        if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()
    ]


def abandoned(out: Path) -> list[Path]:
    """msif's temporary folders for `out` whose writing process is gone, newest first."""
    out = Path(out).expanduser()
    found = [f for f in _siblings(out, "tmp") if _abandoned(f, out)]
    return sorted(found, key=lambda f: (f / MARKER).stat().st_mtime, reverse=True)


def remove_stale(out: Path, keep: Path | None = None) -> list[Path]:
    """Remove msif's own abandoned temporary folders beside `out` (all but `keep`); returns
    what was removed."""
    out = Path(out).expanduser()
    stale = abandoned(out) + [f for f in _siblings(out, "old") if msif_manifest(f) is not None]
    removed = []
    for folder in stale:
        if keep is not None and folder.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
