"""Explorer speed and memory on a large run, measured in headless Chromium.

Generates a synthetic run (default 40,000 pretraining examples, 200 tests, full scores; `--text`
for text rows as a large run has them), serves the explorer on it as `msif explore` does (the
script is run once before the URL is announced) and prints:
- first render of a deep link `?test=ID&scenario=S`: from navigation until the test's rank-1
  helpful and harmful `#<pretrain_id>` are visible (goal <= 3 s), for the first visitor and in
  another tab;
- the map view `?view=map`: from navigation until the map is drawn (its raster image loaded and
  the selected test's star on it; goal <= 3 s);
- switching the selected test by link (a new URL in the same tab) in the map view (goal <= 1 s)
  and in the main view, and from the sidebar in both;
- ten visitors opening different deep links at once, each in its own browser context: the
  time until each sees its rank-1 ids (goal <= 5 s);
- the server's resident memory (the process and its children) after all of it, and its peak;
- the same crowd on a one-line Streamlit page (`--no-floor` skips it): what Streamlit and the
  browser alone cost on this machine at that moment, the floor under the crowd's times.

    python benchmarks/explorer_speed.py [--pretrain 40000] [--tests 200] [--text] [--run DIR]
                                        [--visitors 10] [--no-floor]
    python benchmarks/explorer_speed.py --pretrain 1000000 --tests 50 --text
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.async_api import async_playwright

from explorer.launch import free_port, start, stop, wait_until_healthy, warm_up
from explorer.synthetic import write_synthetic_run
from precompute.rundir import read_table

CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run",
]  # fmt: skip
VIEWPORT = {"width": 1440, "height": 1000}
FIRST_RENDER_GOAL_S = 3.0
MAP_GOAL_S = 3.0
SWITCH_GOAL_S = 1.0
CROWD_GOAL_S = 5.0
RSS_GOAL_MIB = 2048
TIMEOUT_MS = 120_000


def rank1(top, scenario: str, test_id: int) -> tuple[int, int]:
    rows = top[(top["scenario"] == scenario) & (top["test_id"] == test_id) & (top["rank"] == 1)]
    kinds = dict(zip(rows["kind"], rows["pretrain_id"], strict=True))
    return int(kinds["helpful"]), int(kinds["harmful"])


async def wait_for_test(page, top, scenario: str, test_id: int) -> None:
    """Until the header names this test and its rank-1 helpful and harmful ids are visible."""
    heading = page.get_by_role("heading", name=f"Test {test_id}", exact=True)
    await heading.wait_for(timeout=TIMEOUT_MS)
    for kind, pretrain_id in zip(
        ("helpful", "harmful"), rank1(top, scenario, test_id), strict=True
    ):
        locator = page.locator(f".msif-{kind} .msif-id", has_text=re.compile(f"^#{pretrain_id}$"))
        await locator.first.wait_for(timeout=TIMEOUT_MS)


MAP_DRAWN = """(name) => [...document.querySelectorAll('.js-plotly-plot')].some(plot =>
    (plot.data || []).some(trace => trace.name === name)
    && [...plot.querySelectorAll('.imagelayer image')]
        .some(img => (img.getAttribute('href') || '').startsWith('data:image/png')))"""


async def wait_for_map(page, test_id: int) -> None:
    """Until the map is drawn around this test: its star trace (named after it) and the raster
    image of the pretraining examples are in the plot."""
    await page.wait_for_function(MAP_DRAWN, arg=f"test {test_id}", timeout=TIMEOUT_MS)


async def time_link(page, url: str, wait, *args) -> float:
    """Seconds from navigating `page` to `url` until `wait(page, *args)` returns."""
    started = time.perf_counter()
    await page.goto(url)
    await wait(page, *args)
    return time.perf_counter() - started


async def new_page(browser):
    context = await browser.new_context(viewport=VIEWPORT)
    return context, await context.new_page()


async def deep_links(browser, url, top, scenario, tests) -> list[float]:
    """A deep link in a fresh context each (the first visitor, then another tab)."""
    times = []
    for test_id in tests:
        context, page = await new_page(browser)
        link = f"{url}/?test={test_id}&scenario={scenario}"
        times.append(await time_link(page, link, wait_for_test, top, scenario, test_id))
        await context.close()
    return times


async def switches_by_link(
    browser, url, top, scenario, tests, view: str
) -> tuple[float, list[float]]:
    """Open `view` for tests[0] in a fresh context, then each other test by its link in the
    same tab; (first seconds, seconds per switch)."""
    context, page = await new_page(browser)
    times = []
    for test_id in tests:
        link = f"{url}/?test={test_id}&scenario={scenario}&view={view}"
        if view == "map":
            times.append(await time_link(page, link, wait_for_map, test_id))
        else:
            times.append(await time_link(page, link, wait_for_test, top, scenario, test_id))
    errors = await page.locator('[data-testid="stException"], .msif-note-error').count()
    await context.close()
    if errors:
        raise RuntimeError(f"{errors} error boxes on the {view} view")
    return times[0], times[1:]


async def switches_in_sidebar(browser, url, top, scenario, tests, view="examples") -> list[float]:
    """Select each of `tests` in turn from the sidebar's test picker; seconds per switch."""
    context, page = await new_page(browser)

    async def wait(test_id):
        if view == "map":
            await wait_for_map(page, test_id)
        else:
            await wait_for_test(page, top, scenario, test_id)

    await page.goto(f"{url}/?test={tests[0]}&scenario={scenario}&view={view}")
    await wait(tests[0])
    select = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').last
    times = []
    for test_id in tests[1:]:
        await select.click()
        await page.keyboard.type(f"Test {test_id} ·")
        option = page.get_by_role("option", name=re.compile(f"^Test {test_id} ·")).first
        await option.wait_for()
        started = time.perf_counter()
        await option.click()
        await wait(test_id)
        times.append(time.perf_counter() - started)
    await context.close()
    return times


async def crowd(browser, url, top, scenario, tests) -> list[float]:
    """Visitors opening different deep links at the same moment, each in its own context."""
    pages = [await new_page(browser) for _ in tests]

    async def visit(page, test_id):
        link = f"{url}/?test={test_id}&scenario={scenario}"
        return await time_link(page, link, wait_for_test, top, scenario, test_id)

    times = await asyncio.gather(
        *(visit(page, t) for (_, page), t in zip(pages, tests, strict=True))
    )
    for context, _ in pages:
        await context.close()
    return list(times)


FLOOR_TEXT = "msif floor page"
FLOOR_APP = f'import streamlit as st\n\nst.write("{FLOOR_TEXT}")\n'


async def floor_crowd(browser, workdir: Path, visitors: int) -> list[float]:
    """`visitors` opening a one-line Streamlit page at once, each in its own context: the time
    until each sees its line. The explorer cannot beat this on the same machine and load."""
    script = workdir / "floor_app.py"
    script.write_text(FLOOR_APP)
    port = free_port()
    flags = ["--server.address", "127.0.0.1", "--server.port", str(port)]
    flags += ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(script), *flags],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_healthy(port, process)
        url = f"http://127.0.0.1:{port}/"

        async def visit(page):
            started = time.perf_counter()
            await page.goto(url)
            await page.get_by_text(FLOOR_TEXT, exact=True).wait_for(timeout=TIMEOUT_MS)
            return time.perf_counter() - started

        context, page = await new_page(browser)  # the server's first page, not timed
        await visit(page)
        await context.close()
        pages = [await new_page(browser) for _ in range(visitors)]
        times = await asyncio.gather(*(visit(page) for _, page in pages))
        for context, _ in pages:
            await context.close()
        return list(times)
    finally:
        stop(process)


def tree_memory_mib(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of a process and all its descendants (Linux /proc)."""
    resident = peak = 0.0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        resident += int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
        peak += int(fields.get("VmHWM", "0 kB").split()[0]) / 1024
        for task in Path(f"/proc/{current}/task").iterdir():
            try:
                children = (task / "children").read_text().split()
            except OSError:  # a thread that ended meanwhile
                continue
            todo.extend(int(c) for c in children)
    return resident, peak


def describe(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s, max {max(times):.2f} s over {len(times)}"


async def measure(args, run_dir: Path, workdir: Path, top, scenario: str, picks: list[int]) -> dict:
    results: dict = {}
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=args.chromium, args=CHROMIUM_ARGS
        )
        process, port = start(run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_healthy(port, process)
            started = time.perf_counter()
            warm_up(port)
            results["warm_up"] = time.perf_counter() - started
            results["rss_idle"] = tree_memory_mib(process.pid)[0]
            url = f"http://127.0.0.1:{port}"
            results["deep"] = await deep_links(browser, url, top, scenario, picks[:2])
            # every measurement on tests of its own: nothing of theirs is cached yet
            results["map_first"], results["map_switch"] = await switches_by_link(
                browser, url, top, scenario, picks[2:7], view="map"
            )
            _, results["link_switch"] = await switches_by_link(
                browser, url, top, scenario, picks[7:12], view="examples"
            )
            results["sidebar_switch"] = await switches_in_sidebar(
                browser, url, top, scenario, picks[12:17]
            )
            results["map_sidebar_switch"] = await switches_in_sidebar(
                browser, url, top, scenario, picks[17:22], view="map"
            )
            crowd_tests = picks[-args.visitors :]
            results["crowd"] = await crowd(browser, url, top, scenario, crowd_tests)
            results["rss"], results["rss_peak"] = tree_memory_mib(process.pid)
            if args.floor:
                results["floor"] = await floor_crowd(browser, workdir, args.visitors)
        finally:
            stop(process)
            await browser.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain", type=int, default=40_000)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--text", action="store_true", help="text rows instead of digit images")
    parser.add_argument("--visitors", type=int, default=10)
    parser.add_argument("--run", type=Path, help="use (or create) this run directory")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the crowd on a one-line Streamlit page",
    )
    args = parser.parse_args()

    workdir = tempfile.TemporaryDirectory(prefix="msif-bench-")
    run_dir = args.run or Path(workdir.name) / "run"
    if not (run_dir / "manifest.json").exists():
        started = time.perf_counter()
        write_synthetic_run(run_dir, args.pretrain, args.tests, images=not args.text, seed=0)
        print(
            f"wrote a synthetic run ({args.pretrain:,} pretraining x {args.tests} tests x 2 "
            f"scenarios, full scores) in {time.perf_counter() - started:.1f} s"
        )
    size_mb = sum(p.stat().st_size for p in run_dir.iterdir()) / 2**20
    n_pretrain = len(read_table(run_dir, "pretrain", columns=["pretrain_id"]))
    n_tests = len(read_table(run_dir, "test", columns=["test_id"]))
    print(
        f"run: {run_dir} ({n_pretrain:,} pretraining examples, {n_tests} tests, {size_mb:.0f} MiB)"
    )

    top = read_table(run_dir, "top")
    scenario = str(top["scenario"].iloc[0])
    test_ids = sorted(int(t) for t in top.loc[top["scenario"] == scenario, "test_id"].unique())
    needed = 22 + args.visitors
    step = max(1, len(test_ids) // needed)
    picks = (test_ids[::step] + test_ids)[:needed]

    r = asyncio.run(measure(args, run_dir, Path(workdir.name), top, scenario, picks))
    workdir.cleanup()

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    first = max(r["deep"])
    print(f"server warm-up before the URL is announced: {r['warm_up']:.2f} s")
    print(
        f"first render of a deep link: first visitor {r['deep'][0]:.2f} s, another tab "
        f"{r['deep'][1]:.2f} s (goal <= {FIRST_RENDER_GOAL_S:.0f} s: "
        f"{verdict(first <= FIRST_RENDER_GOAL_S)})"
    )
    print(
        f"map view ({n_pretrain:,} points) drawn: {r['map_first']:.2f} s "
        f"(goal <= {MAP_GOAL_S:.0f} s: {verdict(r['map_first'] <= MAP_GOAL_S)})"
    )
    print(
        f"switch test by link in the map view: {describe(r['map_switch'])} "
        f"(goal <= {SWITCH_GOAL_S:.0f} s: {verdict(max(r['map_switch']) <= SWITCH_GOAL_S)})"
    )
    print(f"switch test from the sidebar in the map view: {describe(r['map_sidebar_switch'])}")
    print(f"switch test by link in the main view: {describe(r['link_switch'])}")
    print(f"switch test from the sidebar in the main view: {describe(r['sidebar_switch'])}")
    crowd_max = max(r["crowd"])
    print(
        f"{len(r['crowd'])} visitors opening different links at once: first renders "
        f"{describe(r['crowd'])} (goal <= {CROWD_GOAL_S:.0f} s: "
        f"{verdict(crowd_max <= CROWD_GOAL_S)})"
    )
    if "floor" in r:
        print(
            f"the same {len(r['floor'])} visitors on a one-line Streamlit page (the floor of "
            f"Streamlit and this browser on this machine now): {describe(r['floor'])}"
        )
    print(
        f"server memory (process and children): {r['rss_idle']:.0f} MiB after loading the run, "
        f"{r['rss']:.0f} MiB after all of the above, peak {r['rss_peak']:.0f} MiB "
        f"(goal <= {RSS_GOAL_MIB} MiB: {verdict(r['rss_peak'] <= RSS_GOAL_MIB)})"
    )
    ok = (
        first <= FIRST_RENDER_GOAL_S
        and r["map_first"] <= MAP_GOAL_S
        and max(r["map_switch"]) <= SWITCH_GOAL_S
        and crowd_max <= CROWD_GOAL_S
        and r["rss_peak"] <= RSS_GOAL_MIB
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
