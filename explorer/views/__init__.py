"""One module per view, each with a `render(run, selection)` function.

View modules are imported when first shown, so opening the main view does not pay for plotly;
`preload` imports the others in the background once the first page is drawn.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from types import ModuleType

VIEW_MODULES = {
    "examples": "explorer.views.examples",
    "map": "explorer.views.embedding_map",
    "tests": "explorer.views.tests",
    "distribution": "explorer.views.distribution",
    "classes": "explorer.views.classes",
    "compare": "explorer.views.compare",
    "false_transfer": "explorer.views.false_transfer",
    "provenance": "explorer.views.provenance",
}


def view_module(view: str) -> ModuleType:
    """The module that draws `view` (a key of explorer.state.VIEWS)."""
    return importlib.import_module(VIEW_MODULES[view])


_preloading = threading.Lock()
_preloaded = False


def preload(*warm: Callable[[], object]) -> None:
    """Import every view module in a background thread, once per process, so that the first
    visitor of the map (plotly, about a second of imports) does not wait for them; then call
    each of `warm` there (e.g. to fill a cache the map's first visitor would wait for)."""
    global _preloaded
    with _preloading:
        if _preloaded:
            return
        _preloaded = True

    def run() -> None:
        for name in VIEW_MODULES.values():
            importlib.import_module(name)
        for task in warm:
            try:
                task()
            except Exception:  # only a head start: the visitor's own call reports any problem
                logging.getLogger("msif.explorer").debug("warming failed", exc_info=True)

    threading.Thread(target=run, name="msif-preload", daemon=True).start()
