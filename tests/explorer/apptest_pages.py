"""Reading an AppTest page: URL parameters, st.html bodies and the literal notes in them."""

from __future__ import annotations

import html
import re

NOTE = re.compile(r'<div class="msif-note msif-note-(\w+)" role="\w+">(.*?)</div>', re.S)


def param(at, name: str) -> str | None:
    """A URL parameter as the browser would see it."""
    value = at.query_params.get(name)
    return value[-1] if isinstance(value, list) else value


def html_of(block) -> str:
    """Every st.html body of an AppTest (or of one of its blocks, e.g. at.sidebar)."""
    return "\n".join(element.value for element in block.html)


def notes(block, kind: str) -> list[str]:
    """The texts of the `kind` ("info" | "warning" | "error") notes, as a reader sees them."""
    return [html.unescape(text) for k, text in NOTE.findall(html_of(block)) if k == kind]


def markdown_of(at) -> str:
    """Every element body that streamlit renders as Markdown (where run or URL values must
    never go): markdown, captions, headings, alerts, metric labels and help."""
    parts = []
    for name in ("markdown", "caption", "subheader", "header", "title", "info", "warning"):
        parts += [element.value for element in getattr(at, name)]
    parts += [element.value for element in at.error]
    parts += [metric.label for metric in at.metric]
    return "\n".join(str(p) for p in parts)
