"""Explorer speed on a large run, measured in headless Chromium.

Generates a synthetic run (default 40,000 pretraining examples, full scores), serves the
explorer on it and prints:
- first render of a deep link `?test=ID&scenario=S`: from navigation until the test's rank-1
  helpful and harmful `#<pretrain_id>` are visible (goal <= 5 s), for the first visitor of a
  server started as `msif explore` starts it (explorer.launch: the script is run once before
  the URL is announced) and in another tab; for reference also for the first visitor of a bare
  server that has not run the script yet;
- switching the selected test in the sidebar: from the click until the new test's rank-1 ids
  are visible (goal <= 1 s), over several switches.

    python benchmarks/explorer_speed.py [--pretrain 40000] [--tests 200] [--run DIR]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from explorer.launch import start, stop, wait_until_healthy, warm_up
from explorer.synthetic import write_synthetic_run
from precompute.rundir import read_table

CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run",
]  # fmt: skip
FIRST_RENDER_GOAL_S = 5.0
SWITCH_GOAL_S = 1.0


def rank1(top, scenario: str, test_id: int) -> tuple[int, int]:
    rows = top[(top["scenario"] == scenario) & (top["test_id"] == test_id) & (top["rank"] == 1)]
    kinds = dict(zip(rows["kind"], rows["pretrain_id"], strict=True))
    return int(kinds["helpful"]), int(kinds["harmful"])


def wait_for_test(page, top, scenario: str, test_id: int, timeout_ms: int = 60_000) -> None:
    """Until the header names this test and its rank-1 helpful and harmful ids are visible."""
    page.get_by_role("heading", name=f"Test {test_id}", exact=True).wait_for(timeout=timeout_ms)
    for kind, pretrain_id in zip(
        ("helpful", "harmful"), rank1(top, scenario, test_id), strict=True
    ):
        locator = page.locator(f".msif-{kind} .msif-id", has_text=re.compile(f"^#{pretrain_id}$"))
        locator.first.wait_for(timeout=timeout_ms)


def time_deep_link(browser, url: str, top, scenario: str, test_id: int) -> float:
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    started = time.perf_counter()
    page.goto(f"{url}/?test={test_id}&scenario={scenario}")
    wait_for_test(page, top, scenario, test_id)
    elapsed = time.perf_counter() - started
    page.close()
    return elapsed


def wait_for_map(page, test_id: int, timeout_ms: int = 60_000) -> None:
    """Until the map has been redrawn around this test (its star trace is named after it)."""
    page.wait_for_function(
        """(name) => [...document.querySelectorAll('.js-plotly-plot')]
            .some(plot => (plot.data || []).some(trace => trace.name === name))""",
        arg=f"test {test_id}",
        timeout=timeout_ms,
    )


def time_switches(
    browser, url: str, top, scenario: str, tests: list[int], view: str = "examples"
) -> list[float]:
    """Select each of `tests` in turn from the sidebar; seconds per switch."""
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(f"{url}/?test={tests[0]}&scenario={scenario}&view={view}")
    if view == "map":
        wait_for_map(page, tests[0])
    else:
        wait_for_test(page, top, scenario, tests[0])
    select = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').last
    times = []
    for test_id in tests[1:]:
        select.click()
        page.keyboard.type(f"Test {test_id} ·")
        option = page.get_by_role("option", name=re.compile(f"^Test {test_id} ·")).first
        option.wait_for()
        started = time.perf_counter()
        option.click()
        if view == "map":
            wait_for_map(page, test_id)
        else:
            wait_for_test(page, top, scenario, test_id)
        times.append(time.perf_counter() - started)
    exceptions = page.locator('[data-testid="stException"]').count()
    page.close()
    if exceptions:
        raise RuntimeError(f"{exceptions} exception boxes on the page")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain", type=int, default=40_000)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--switches", type=int, default=8)
    parser.add_argument("--run", type=Path, help="use (or create) this run directory")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    workdir = tempfile.TemporaryDirectory(prefix="msif-bench-")
    run_dir = args.run or Path(workdir.name) / "run"
    if not (run_dir / "manifest.json").exists():
        started = time.perf_counter()
        write_synthetic_run(run_dir, args.pretrain, args.tests, top_k=10, seed=0)
        print(
            f"wrote a synthetic run ({args.pretrain:,} pretraining x {args.tests} tests x 2 "
            f"scenarios, full scores) in {time.perf_counter() - started:.1f} s"
        )
    size_mb = sum(p.stat().st_size for p in run_dir.iterdir()) / 2**20
    n_pretrain = len(read_table(run_dir, "pretrain", columns=["pretrain_id"]))
    print(f"run: {run_dir} ({n_pretrain:,} pretraining examples, {size_mb:.0f} MiB)")

    top = read_table(run_dir, "top")
    scenario = str(top["scenario"].iloc[0])
    test_ids = sorted(int(t) for t in top.loc[top["scenario"] == scenario, "test_id"].unique())
    step = max(1, len(test_ids) // (args.switches + 2))
    picks = test_ids[::step][: args.switches + 2]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        # as `msif explore` serves it: the script is run once before the URL is announced
        process, port = start(run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_healthy(port, process)
            started = time.perf_counter()
            warm_up(port)
            warm_up_s = time.perf_counter() - started
            url = f"http://127.0.0.1:{port}"
            first = time_deep_link(browser, url, top, scenario, picks[0])
            again = time_deep_link(browser, url, top, scenario, picks[1])
            switches = time_switches(browser, url, top, scenario, picks[1:])
            map_switches = time_switches(browser, url, top, scenario, picks[:4], view="map")
        finally:
            stop(process)
        # for reference: a bare streamlit server whose first visitor pays imports and loading
        process, port = start(run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_healthy(port, process)
            cold = time_deep_link(browser, f"http://127.0.0.1:{port}", top, scenario, picks[0])
        finally:
            stop(process)
        browser.close()
    workdir.cleanup()

    first_ok = max(first, again) <= FIRST_RENDER_GOAL_S
    switch_ok = max(switches) <= SWITCH_GOAL_S
    verdict = {True: "met", False: "MISSED"}
    print(f"server warm-up before the URL is announced: {warm_up_s:.2f} s")
    print(f"first render of a deep link, first visitor: {first:.2f} s")
    print(
        f"first render of a deep link, another tab:   {again:.2f} s "
        f"(goal <= {FIRST_RENDER_GOAL_S:.0f} s: {verdict[first_ok]})"
    )
    print(f"first render without the warm-up (reference): {cold:.2f} s")
    print(
        f"switch selected test: median {statistics.median(switches):.2f} s, "
        f"max {max(switches):.2f} s over {len(switches)} switches "
        f"(goal <= {SWITCH_GOAL_S:.0f} s: {verdict[switch_ok]})"
    )
    print(
        f"for reference, switch in the embedding map view ({n_pretrain:,} points, WebGL): "
        f"median {statistics.median(map_switches):.2f} s, max {max(map_switches):.2f} s"
    )
    return 0 if first_ok and switch_ok else 1


if __name__ == "__main__":
    sys.exit(main())
