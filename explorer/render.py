"""Shared presentation: colours, thumbnails, example cards and literal notes (HTML built from
escaped data).

Everything that comes from a run or from the URL (text, label and scenario names, run folders,
manifest values) is shown as text, never as Markdown or HTML: it goes through `html.escape`
into `st.html` (`note`, `heading`, `caption`, the cards), or through `markdown_literal` where a
widget renders its labels as Markdown. Small images are scaled up without blurring (CSS
`image-rendering: pixelated`).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re

import pandas as pd
import streamlit as st
from PIL import Image
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

# One colour per meaning, used by every view (cards, bars, map, charts).
HELPFUL = "#1a9850"
HARMFUL = "#d6452b"
HELPFUL_LIGHT = "#e9f6ee"
HARMFUL_LIGHT = "#fdeeea"
NEUTRAL = "#c9ccd1"
TEST_MARK = "#1f3a93"
# Diverging scale centred at zero: harmful red, neutral grey, helpful green.
DIVERGING = [[0.0, HARMFUL], [0.5, "#eceff1"], [1.0, HELPFUL]]
KIND_COLOURS = {"helpful": HELPFUL, "harmful": HARMFUL}

CSS = f"""
<style>
[data-testid="stMainBlockContainer"] {{ padding: 2.2rem 3rem 3rem 3rem; }}
.msif-list {{ display: grid; gap: 10px;
  grid-template-columns: repeat(auto-fill, minmax(104px, 1fr)); }}
.msif-list.msif-textual {{ grid-template-columns: 1fr; }}
.msif-card {{ border: 1px solid #e3e6ea; border-radius: 10px; padding: 8px; background: #fff;
  font-family: "Source Sans Pro", sans-serif; font-size: 13px; color: #262730; }}
.msif-helpful .msif-card {{ border-top: 4px solid {HELPFUL}; }}
.msif-harmful .msif-card {{ border-top: 4px solid {HARMFUL}; }}
.msif-card img.msif-thumb {{ width: 100%; max-width: 96px; aspect-ratio: 1; display: block;
  margin: 0 auto 6px auto; image-rendering: pixelated; border-radius: 4px; background: #000; }}
.msif-text {{ white-space: pre-wrap; word-break: break-word; background: #f6f7f9;
  border-radius: 6px; padding: 6px 8px; margin-bottom: 6px; font-size: 13px;
  font-family: "Source Code Pro", monospace; max-height: 7.5em; overflow: auto; }}
.msif-shared {{ background: #fde68a; color: inherit; padding: 0 1px; border-radius: 2px; }}
.msif-facts-line {{ display: flex; gap: 14px; align-items: baseline; margin-bottom: 6px; }}
.msif-facts-line .msif-head {{ gap: 10px; }}
.msif-head {{ display: flex; justify-content: space-between; align-items: baseline; }}
.msif-id {{ font-weight: 700; font-size: 14px; }}
.msif-id a {{ color: inherit; text-decoration: none; }}
.msif-id a:hover {{ text-decoration: underline; }}
.msif-rank {{ color: #6b7280; font-size: 12px; }}
.msif-label {{ color: #4b5563; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }}
.msif-score {{ font-variant-numeric: tabular-nums; font-weight: 600; }}
.msif-helpful .msif-score {{ color: {HELPFUL}; }}
.msif-harmful .msif-score {{ color: {HARMFUL}; }}
.msif-bar {{ height: 5px; background: #eef0f3; border-radius: 3px; margin-top: 4px; }}
.msif-bar > div {{ height: 5px; border-radius: 3px; }}
.msif-helpful .msif-bar > div {{ background: {HELPFUL}; }}
.msif-harmful .msif-bar > div {{ background: {HARMFUL}; }}
.msif-share {{ color: #6b7280; font-size: 11px; }}
.msif-title {{ font-size: 18px; font-weight: 700; margin: 0 0 2px 0; }}
.msif-helpful .msif-title {{ color: {HELPFUL}; }}
.msif-harmful .msif-title {{ color: {HARMFUL}; }}
.msif-sub {{ color: #6b7280; font-size: 13px; margin-bottom: 10px; }}
.msif-hero {{ display: flex; gap: 22px; align-items: center; padding: 14px 18px;
  border: 1px solid #e3e6ea; border-radius: 12px; background: #fafbfc; }}
.msif-hero img {{ width: 128px; height: 128px; image-rendering: pixelated; border-radius: 6px;
  background: #000; }}
.msif-hero .msif-text {{ max-width: 520px; max-height: 9em; font-size: 14px; }}
.msif-hero h2 {{ margin: 0 0 6px 0; font-size: 26px; }}
.msif-facts {{ display: flex; gap: 28px; flex-wrap: wrap; }}
.msif-fact .k {{ color: #6b7280; font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }}
.msif-fact .v {{ font-size: 20px; font-weight: 600; }}
.msif-summary {{ font-size: 15px; color: #374151; margin: 2px 0 6px 0; }}
.msif-helpful-word {{ color: {HELPFUL}; font-weight: 600; }}
.msif-harmful-word {{ color: {HARMFUL}; font-weight: 600; }}
.msif-ok {{ color: {HELPFUL}; }}
.msif-bad {{ color: {HARMFUL}; }}
.msif-note {{ padding: 16px; border-radius: 8px; font-size: 16px; line-height: 1.5;
  white-space: pre-wrap; overflow-wrap: anywhere; }}
.msif-note-info {{ background: #edf5ff; color: #244fb4; }}
.msif-note-warning {{ background: #fffae5; color: #956b0f; }}
.msif-note-error {{ background: #fff1f2; color: #9e303b; }}
.msif-h3 {{ font-size: 28px; font-weight: 600; line-height: 1.2; padding: 12px 0 16px 0;
  margin: 0; color: #262730; overflow-wrap: anywhere; }}
.msif-caption {{ font-size: 14px; color: rgba(38, 39, 48, 0.6); overflow-wrap: anywhere; }}
</style>
"""


def png_data_uri(png: bytes | None, upscale_to: int | None = None) -> str | None:
    """A data URI of a PNG; optionally upscaled with nearest neighbour (for canvases that
    smooth small images, like the picker table)."""
    if png is None or (isinstance(png, float) and math.isnan(png)):
        return None
    if upscale_to:
        image = Image.open(io.BytesIO(png))
        if image.width < upscale_to:
            factor = max(1, upscale_to // image.width)
            image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            png = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def content_words(text) -> frozenset[str]:
    """The lowercased words of a text, without English stop words (scikit-learn's list)."""
    if not _present(text):
        return frozenset()
    return frozenset(w.lower() for w in WORD.findall(str(text))) - ENGLISH_STOP_WORDS


def highlighted(text: str, words: frozenset[str]) -> str:
    """The text, HTML-escaped, with each word found in `words` wrapped in <mark>."""
    out, last = [], 0
    for match in WORD.finditer(text):
        word = match.group(0)
        out.append(html.escape(text[last : match.start()]))
        escaped = html.escape(word)
        marked = word.lower() in words
        out.append(f'<mark class="msif-shared">{escaped}</mark>' if marked else escaped)
        last = match.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def example_body(
    row: pd.Series | dict, css_class: str = "msif-thumb", shared: frozenset[str] = frozenset()
) -> str:
    """The input itself: the image, else the text shown literally (words in `shared` marked),
    else a placeholder."""
    uri = png_data_uri(row.get("image_png"))
    if uri:
        return f'<img class="{css_class}" src="{uri}" alt="example image">'
    text = row.get("text")
    if _present(text):
        return f'<div class="msif-text">{highlighted(str(text), shared)}</div>'
    return '<div class="msif-text">(no image or text)</div>'


def label_text(row: pd.Series | dict, name_col: str = "label_name", id_col: str = "label") -> str:
    name, value = row.get(name_col), row.get(id_col)
    if _present(name):
        return str(name)
    return str(int(value)) if _present(value) else "unlabelled"


def format_score(score: float) -> str:
    return f"{score:+.3g}"


def example_cards(
    rows: pd.DataFrame,
    kind: str,
    total_abs: float | None,
    link=None,
    shared: frozenset[str] = frozenset(),
) -> str:
    """A grid of cards, one per top-k example: input, `#<pretrain_id>`, label, score, share.

    Image examples get a square card each; text examples a full-width card whose facts sit
    on one line above the text, with the words in `shared` (the test's words) marked.
    `link(pretrain_id)`, when given, makes each id a link.
    """
    textual = rows["image_png"].isna().all() if "image_png" in rows else True
    cards = []
    for _, row in rows.iterrows():
        share = abs(float(row["score"])) / total_abs if total_abs else 0.0
        head = (
            '<div class="msif-head">'
            f'<span class="msif-id">{_id_link(int(row["pretrain_id"]), link)}</span>'
            f'<span class="msif-rank">rank {int(row["rank"])}</span></div>'
        )
        label = f'<div class="msif-label">{html.escape(label_text(row))}</div>'
        score = f'<div class="msif-score">{format_score(float(row["score"]))}</div>'
        bar = (
            f'<div class="msif-bar"><div style="width:{min(100.0, 100 * share):.1f}%"></div>'
            f'</div><div class="msif-share">{100 * share:.1f}% share</div>'
        )
        if textual:
            facts = f'<div class="msif-facts-line">{head}{label}{score}</div>'
            body = example_body(row, shared=shared)
            cards.append(f'<div class="msif-card">{facts}{body}{bar}</div>')
        else:
            cards.append(
                f'<div class="msif-card">{example_body(row)}{head}{label}{score}{bar}</div>'
            )
    layout = "msif-list msif-textual" if textual else "msif-list"
    return f'<div class="msif-{kind}"><div class="{layout}">' + "".join(cards) + "</div></div>"


def _id_link(pretrain_id: int, link) -> str:
    if link is None:
        return f"#{pretrain_id}"
    return f'<a href="{html.escape(link(pretrain_id))}" title="open on the map">#{pretrain_id}</a>'


def list_header(kind: str, subtitle: str) -> str:
    title = "Helpful" if kind == "helpful" else "Harmful"
    return (
        f'<div class="msif-{kind}"><div class="msif-title">{title}</div>'
        f'<div class="msif-sub">{html.escape(subtitle)}</div></div>'
    )


# --- Text from a run or the URL, shown literally ----------------------------------------------

NOTE_KINDS = ("info", "warning", "error")


def literal_html(text, css_class: str, tag: str = "div", role: str | None = None) -> str:
    """`text` as one HTML element whose content reads exactly as typed (escaped, so no tag,
    entity, Markdown, directive or formula in it means anything)."""
    attribute = f' role="{role}"' if role else ""
    return f'<{tag} class="{css_class}"{attribute}>{html.escape(str(text))}</{tag}>'


def note(kind: str, text, where=None) -> None:
    """An info, warning or error box (`kind`) showing `text` literally; `where` is a container
    such as st.sidebar (default: the main area)."""
    if kind not in NOTE_KINDS:
        raise ValueError(f"note kind must be one of {NOTE_KINDS}, not {kind!r}")
    role = "status" if kind == "info" else "alert"
    (where or st).html(literal_html(text, f"msif-note msif-note-{kind}", role=role))


def heading(text, where=None) -> None:
    """A section heading (as st.subheader) showing `text` literally."""
    (where or st).html(literal_html(text, "msif-h3", tag="h3"))


def caption(text, where=None) -> None:
    """Small grey text (as st.caption) showing `text` literally."""
    (where or st).html(literal_html(text, "msif-caption"))


_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def markdown_literal(text) -> str:
    """`text` for a widget that renders its labels as Markdown (st.segmented_control options):
    every ASCII punctuation character backslash-escaped, which CommonMark shows as itself, so
    no emphasis, directive (:red[...], :material/...:), formula, link or tag is formed."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def plotly_text(text) -> str:
    """`text` for plotly labels and legends, which render a few tags (<b>, <a href>)."""
    return html.escape(str(text))
