"""Serve the explorer: `msif explore RUN_DIR_OR_RUNS_ROOT [--port P]` calls `serve`."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from explorer.targets import target_problem

PACKAGE_DIR = Path(__file__).resolve().parent
APP = PACKAGE_DIR / "app.py"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def preferred_port(port: int = 8501) -> int:
    """Streamlit's usual port when it is free, else any free one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def command(port: int) -> list[str]:
    """The streamlit command line for the explorer on 127.0.0.1:`port`."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", "127.0.0.1",
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--server.scriptHealthCheckEnabled", "true",  # lets warm_up run the script once
    ]  # fmt: skip


def environment(target: Path) -> dict[str, str]:
    """The environment of the app process: the run (or folder of runs) in MSIF_RUN, and the
    folder holding the `explorer` package on the path (streamlit only adds the script's own)."""
    paths = [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "MSIF_RUN": str(Path(target).expanduser().resolve()),
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }


def start(target: Path, port: int | None = None, **popen_kwargs) -> tuple[subprocess.Popen, int]:
    """Start the explorer in the background; returns the process and its port.

    The working directory is the package folder, so streamlit reads the shipped light theme
    from explorer/.streamlit/config.toml.
    """
    port = port or free_port()
    process = subprocess.Popen(
        command(port), cwd=PACKAGE_DIR, env=environment(target), **popen_kwargs
    )
    return process, port


def port_problem(port) -> str | None:
    """Why the explorer cannot listen on 127.0.0.1:`port`, as one sentence, or None."""
    if isinstance(port, bool) or not isinstance(port, int):
        return f"port {port!r} is not an integer"
    if not 1 <= port <= 65535:
        return f"port {port} is out of range: give a port from 1 to 65535"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as tornado does: a port whose last connection is closing (TIME_WAIT) is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on 127.0.0.1 is already in use: pick another with --port"
            if exc.errno == errno.EACCES:
                return f"port {port} needs privileges this user lacks: pick one above 1023"
            return f"port {port} cannot be opened on 127.0.0.1 ({exc.strerror or exc})"
    return None


def serve(target: Path, port: int | None = None) -> int:
    """Run the explorer on `target` (a run directory or a folder of runs) until interrupted;
    returns streamlit's exit code, or 2 after one sentence on stderr when the target cannot be
    shown or the port cannot be used (checked before streamlit starts)."""
    problem = target_problem(Path(target).expanduser())
    if problem is None and port is not None:
        problem = port_problem(port)
    if problem is not None:
        print(f"msif explore: {problem}", file=sys.stderr)
        return 2
    process, port = start(Path(target), port or preferred_port())
    try:
        wait_until_healthy(port, process)
        warm_up(port)
        if process.poll() is not None:  # another server answered on the port, ours exited
            raise RuntimeError(f"the explorer exited with code {process.returncode}")
        print(f"msif explorer on http://127.0.0.1:{port}  (Ctrl+C to stop)", flush=True)
        return process.wait()
    except RuntimeError as exc:  # streamlit exited, or never answered
        print(f"msif explore: {exc}", file=sys.stderr)
        return stop(process) or 1
    except KeyboardInterrupt:
        return stop(process)


def stop(process: subprocess.Popen, timeout: float = 10.0) -> int:
    """Stop the explorer process (terminate, then kill) and return its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def wait_until_healthy(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Block until streamlit answers /_stcore/health on `port` (RuntimeError otherwise)."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/_stcore/health"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the explorer exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the explorer did not answer on port {port} within {timeout:.0f} s")


def warm_up(port: int, timeout: float = 120.0) -> bool:
    """Run the app script once in a headless session (streamlit's script health check), so
    the first visitor finds the imports done and the run already loaded in the cache."""
    url = f"http://127.0.0.1:{port}/_stcore/script-health-check"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False
