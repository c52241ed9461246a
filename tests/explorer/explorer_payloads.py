"""Markdown, Streamlit-directive, LaTeX and HTML payloads, and a run made of them."""

from __future__ import annotations

from pathlib import Path

from explorer.synthetic import write_synthetic_run

LINK = "[Session expired: click here](https://evil.example/login)"
PAYLOADS = [
    LINK,
    "**bold**",
    ":red[x]",
    "<b>x</b>",
    "$x^2$",
    "![img](https://evil.example/y.png)",
    "<img src=https://evil.example/z.png>",
    ":material/home: :smile:",
    "<a href='https://evil.example/a'>a</a> & &amp;",
    "# heading\n- item",
]
CLASS_NAMES = tuple(PAYLOADS[:10])  # one payload per digit class
SCENARIOS = ("fixed", "**upd** [s](https://evil.example/s) $x$")
TASK = f"{LINK} :red[task] <i>t</i>"
RUN_NAME = ":red[run] **x** $y$ <img src=x onerror=alert(1)>"  # a folder name: no slash
UNCONVERGED_TEST = 1  # in SCENARIOS[1]


def write_payload_run(parent: Path) -> Path:
    """A run whose folder, task, scenario and class names are payloads; test 1 of the payload
    scenario is listed as unconverged."""
    return write_synthetic_run(
        parent / RUN_NAME,
        120,
        8,
        seed=6,
        scenarios=SCENARIOS,
        class_names=CLASS_NAMES,
        manifest={"task": TASK, "unconverged_tests": {SCENARIOS[1]: [UNCONVERGED_TEST]}},
    )
