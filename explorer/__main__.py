"""`python -m explorer RUN_DIR_OR_RUNS_ROOT [--port P]`: serve the explorer (as `msif explore`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from explorer.launch import serve


def _port(text: str) -> int:
    """A --port value: a whole number from 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {text!r}")
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m explorer", description=__doc__)
    parser.add_argument("target", type=Path, help="a run directory or a folder of runs")
    parser.add_argument("--port", type=_port, default=None, help="default: a free port")
    args = parser.parse_args(argv)
    return serve(args.target, args.port)


if __name__ == "__main__":
    sys.exit(main())
