"""One module per view, each with a `render(run, selection)` function.

View modules are imported when first shown, so opening the main view does not pay for plotly.
"""

from __future__ import annotations

import importlib
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
