"""The embedding map: every pretraining example on the precomputed UMAP, coloured by the selected
test's scores (by class when the run has no scores.parquet), with the top-k, the opened example
and the test on top; box or lasso select lists the examples inside; search by id or text.

A million points never travel as JSON: the server draws them into one PNG (explorer.raster,
cached per run, test and zoom) that plotly shows as a layout image under a small overlay of
interactive markers (the test examples, the top-k, the selected test). Plotly's own zoom and
pan magnify that image at once; a few lines of JavaScript (ZOOM_HOOK) then report the new
ranges, and the server redraws the raster for them (`?zoom=x0,x1,y0,y1`, a link like the rest).
"""

from __future__ import annotations

import base64
import functools
import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from explorer import data, raster, state
from explorer.data import Run
from explorer.render import (
    HARMFUL,
    HELPFUL,
    TEST_MARK,
    caption,
    example_body,
    format_score,
    heading,
    label_text,
    note,
    plotly_text,
    png_data_uri,
)
from explorer.state import Selection

# Reports the map's axis ranges after the reader zooms or pans (plotly_relayout), or that the
# axes were reset (a double click); runs in the page, beside the map's plotly chart.
# Every zoom mounts a new chart (its key holds the view), and the reader may double-click it
# as soon as it is drawn: the listener must be on it by then, or the reset is lost (the map
# autoranges over the zoomed raster and the URL keeps the zoom). So a MutationObserver hooks
# each new chart in the same task that draws it, before any click can reach it; the timer is a
# fallback. A hooked chart carries data-msif-zoom="hooked" (the browser tests wait for it).
ZOOM_JS = r"""
export default function(component) {
  const { setTriggerValue } = component;
  const listeners = new Map();  // plot -> its plotly_relayout listener
  const listener = (plot) => (event) => {
    if (event['xaxis.autorange'] || event['yaxis.autorange']) {
      setTriggerValue('zoom', {whole: true});
    } else if (Object.keys(event).some(k => /^[xy]axis\.range/.test(k))) {
      const x = plot.layout.xaxis.range, y = plot.layout.yaxis.range;
      setTriggerValue('zoom', {x0: x[0], x1: x[1], y0: y[0], y1: y[1]});
    }
  };
  const hook = () => {
    for (const [plot, onRelayout] of listeners) {
      if (!plot.isConnected) {
        if (plot.removeListener) plot.removeListener('plotly_relayout', onRelayout);
        listeners.delete(plot);
      }
    }
    for (const plot of document.querySelectorAll('.js-plotly-plot')) {
      if (!plot.on || !plot.layout || !(plot.layout.images || []).length) continue;
      if (!listeners.has(plot)) listeners.set(plot, listener(plot));
      // off, then on again: plotly drops the listeners when it redraws a chart from scratch
      plot.removeListener('plotly_relayout', listeners.get(plot));
      plot.on('plotly_relayout', listeners.get(plot));
      if (plot.getAttribute('data-msif-zoom') !== 'hooked') {
        plot.setAttribute('data-msif-zoom', 'hooked');
      }
    }
  };
  const observer = new MutationObserver(hook);
  observer.observe(document.body, {childList: true, subtree: true});
  const timer = setInterval(hook, 250);
  hook();
  return () => {
    observer.disconnect();
    clearInterval(timer);
    for (const [plot, onRelayout] of listeners) {
      if (plot.removeListener) plot.removeListener('plotly_relayout', onRelayout);
      plot.removeAttribute('data-msif-zoom');
    }
    listeners.clear();
  };
}
"""
ZOOM_HOOK = st.components.v2.component("msif_map_zoom", js=ZOOM_JS)
ZOOM_KEY = "map_zoom_hook"
PLOTLY_SHOWN = "map_drawn_before"  # session state: this page has drawn the map once
SELECTION_ROWS = 100  # examples of a selection listed on the page (the CSV has them all)
EXPORT_ROWS = 200_000  # at most this many in the CSV, strongest |score| first
SEARCH_ROWS = 100
MIDDLE = "rgb({},{},{})".format(*raster.MIDDLE_RGB)
RASTER_SCALE = [[0.0, HARMFUL], [0.5, MIDDLE], [1.0, HELPFUL]]  # raster.score_image's colours


def _labels(frame) -> np.ndarray:
    """Class names escaped for plotly's hover labels (which would render tags in the data)."""
    return np.array([html.escape(name) for name in data.class_names(frame)], dtype=object)


def _snippets(frame) -> np.ndarray:
    """The first words of each example's text (escaped), for the hover label; "" for images."""
    if "text" not in frame:
        return np.full(len(frame), "", dtype=object)
    texts = frame["text"].astype("string").fillna("").str.slice(0, 60)
    return np.array([f"<br>{html.escape(t)}" if t else "" for t in texts], dtype=object)


def extent(run: Run) -> tuple[raster.Extent, raster.Extent | None]:
    """The whole map's extent, and the zoomed one from the URL (None when not zoomed)."""
    whole = data.map_extent(run)
    return whole, raster.Extent.parse(state.param("zoom"))


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _dummy(name: str, colour: str, symbol: str = "square", **marker) -> go.Scatter:
    """A legend entry (or colour bar) without points."""
    return go.Scatter(
        x=[None],
        y=[None],
        mode="markers",
        name=name,
        marker=dict(size=10, color=colour, symbol=symbol, **marker),
        hoverinfo="skip",
    )


def figure(run: Run, selection: Selection, view: raster.Extent) -> go.Figure:
    """The map as a plotly figure: the raster as a layout image, markers on top."""
    png, limit, classes = data.map_image(run, selection.scenario, selection.test_id, view)
    image = dict(
        source=_uri(png),
        xref="x",
        yref="y",
        x=view.x0,
        y=view.y1,
        sizex=view.x1 - view.x0,
        sizey=view.y1 - view.y0,
        sizing="stretch",
        layer="below",
    )
    traces = []  # built first, then the figure at once: plotly validates it a single time
    count = f"{len(run.pretrain):,} pretraining examples"
    if limit is not None:
        traces.append(
            _dummy(
                count,
                MIDDLE,
                colorscale=RASTER_SCALE,
                cmin=-limit,
                cmax=limit,
                colorbar=dict(title="score", thickness=12, len=0.6),
                showscale=True,
            )
        )
    else:
        traces.append(_dummy(count, MIDDLE))
        last = len(raster.PALETTE) - 1  # the palette's last colour is shared by the rest
        for index, name in enumerate(classes[: last + 1]):
            label = "other classes" if index == last and len(classes) > last + 1 else name
            traces.append(
                _dummy(plotly_text(label), "rgb({},{},{})".format(*raster.PALETTE[index]))
            )

    test = run.test
    others = test.drop(index=selection.test_id)
    trace = go.Scattergl if len(others) > 2000 else go.Scatter
    # open markers, fainter when there are many: the pretraining colours under them show
    many = len(others) > 100
    traces.append(
        trace(
            x=others["umap_x"],
            y=others["umap_y"],
            mode="markers",
            name="test examples (click to select)",
            marker=dict(
                size=6 if many else 8,
                symbol="diamond-open",
                color=TEST_MARK,
                opacity=0.5 if many else 0.75,
                line=dict(width=1),
            ),
            customdata=np.stack(
                [
                    np.full(len(others), "test"),
                    others.index.astype(str),
                    _labels(others),
                    _snippets(others),
                ],
                axis=1,
            )
            if len(others)
            else None,
            hovertemplate="Test %{customdata[1]} · %{customdata[2]}%{customdata[3]}<extra></extra>",
            unselected=dict(marker=dict(opacity=0.5 if many else 0.75)),
        )
    )
    for kind, colour in (("helpful", HELPFUL), ("harmful", HARMFUL)):
        top = data.top_list(run, selection.scenario, selection.test_id, kind, selection.k)
        traces.append(
            go.Scatter(
                x=top["umap_x"],
                y=top["umap_y"],
                mode="markers",
                name=f"top-{selection.k} {kind}",
                marker=dict(size=12, color=colour, line=dict(width=1.5, color="white")),
                customdata=np.stack(
                    [
                        np.full(len(top), "pretrain"),
                        top["pretrain_id"].astype(str),
                        _labels(top),
                        [format_score(s) for s in top["score"]],
                        _snippets(top),
                    ],
                    axis=1,
                )
                if len(top)
                else None,
                hovertemplate="#%{customdata[1]} · %{customdata[2]}<br>score %{customdata[3]}"
                "%{customdata[4]}<extra></extra>",
                unselected=dict(marker=dict(opacity=1)),
            )
        )
    if selection.example is not None:
        opened = run.pretrain.loc[selection.example]
        traces.append(
            go.Scatter(
                x=[opened["umap_x"]],
                y=[opened["umap_y"]],
                mode="markers",
                name=f"#{selection.example}",
                marker=dict(size=22, symbol="circle-open", color="#111827", line=dict(width=3)),
                hoverinfo="skip",
                unselected=dict(marker=dict(opacity=1)),
            )
        )
    row = test.loc[selection.test_id]
    traces.append(
        go.Scatter(
            x=[row["umap_x"]],
            y=[row["umap_y"]],
            mode="markers",
            name=f"test {selection.test_id}",
            marker=dict(
                size=20, symbol="star", color=TEST_MARK, line=dict(width=1.5, color="white")
            ),
            hoverinfo="skip",
            unselected=dict(marker=dict(opacity=1)),
        )
    )
    axis = dict(showticklabels=False, showgrid=False, zeroline=False)
    layout = dict(
        template="plotly_white",
        images=[image],
        font=dict(family="Source Sans Pro, sans-serif", size=13, color="#262730"),
        height=600,
        margin=dict(l=10, r=10, t=10, b=10),
        plot_bgcolor="white",
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0),
        clickmode="event+select",
        dragmode="zoom",  # a click on a marker still selects it (not so in "select" mode)
        uirevision=view.text(),  # a new test keeps the reader's pan and zoom
        xaxis=dict(title="UMAP 1", range=[view.x0, view.x1], **axis),
        yaxis=dict(title="UMAP 2", range=[view.y0, view.y1], **axis),
    )
    return go.Figure(data=traces, layout=layout)


@functools.cache
def blank_figure() -> go.Figure:
    """An empty chart of the map's size: what the map's place shows until the map arrives."""
    hidden = dict(visible=False)
    fig = go.Figure()
    fig.update_layout(
        height=600,
        margin=dict(l=10, r=10, t=10, b=10),
        plot_bgcolor="white",
        paper_bgcolor="white",
        xaxis=hidden,
        yaxis=hidden,
    )
    return fig


def warm(run: Run) -> None:
    """Draw the whole map of the run's first test once, off any page: the server process then
    holds the raster's shared part and plotly's validators (imported on first use), and the
    first visitor of the map waits for neither."""
    scenario = run.scenarios[0]
    test_id = state.default_test(run, scenario)
    selection = Selection(scenario, test_id, min(state.DEFAULT_K, max(1, run.top_k)), "map")
    figure(run, selection, data.map_extent(run)).to_dict()
    blank_figure().to_dict()


def _on_zoom() -> None:
    """The reader zoomed or panned: redraw the raster for the new ranges (or the whole map)."""
    zoom = (st.session_state.get(ZOOM_KEY) or {}).get("zoom") or {}
    if zoom.get("whole"):
        state.set_url("zoom", None)
        return
    try:
        (x0, x1), (y0, y1) = sorted((zoom["x0"], zoom["x1"])), sorted((zoom["y0"], zoom["y1"]))
    except (KeyError, TypeError):
        return
    extent = raster.Extent.parse(raster.Extent(x0, x1, y0, y1).text())
    if extent is not None:
        state.set_url("zoom", extent.text())


def _on_select(key: str) -> None:
    """A click on a marker selects that test or opens that example; a box or lasso is read by
    `render` from the chart's state."""
    chosen = st.session_state[key].selection
    if chosen.box or chosen.lasso:
        return
    points = chosen.points
    if not points or "customdata" not in points[0]:
        return
    kind, identifier = points[0]["customdata"][:2]
    if kind == "test":
        state.select_test(int(identifier))
    else:
        st.query_params["example"] = str(int(identifier))


def _region(chosen) -> tuple[tuple | None, tuple | None]:
    """The box ((x0, x1), (y0, y1)) or lasso ((x...), (y...)) of a chart selection."""
    if chosen.box:
        box = chosen.box[0]
        return (tuple(box["x"]), tuple(box["y"])), None
    if chosen.lasso:
        lasso = chosen.lasso[0]
        return None, (tuple(lasso["x"]), tuple(lasso["y"]))
    return None, None


def region_table(run: Run, selection: Selection, positions: np.ndarray) -> pd.DataFrame:
    """The selected examples with their score for the selected test (NaN when unknown),
    strongest |score| first."""
    ids = run.pretrain.index.to_numpy()[positions]
    values = data.score_values(run, selection.scenario, selection.test_id)
    if values is not None:
        scores = values[positions].astype(np.float64)
    else:  # only the top-k lists' scores are known
        top = pd.concat(
            data.top_list(run, selection.scenario, selection.test_id, kind, run.top_k)
            for kind in ("helpful", "harmful")
        ).set_index("pretrain_id")["score"]
        scores = top.reindex(ids).to_numpy(dtype=np.float64)
    order = np.argsort(-np.nan_to_num(np.abs(scores), nan=-1.0), kind="stable")
    classes = data.pretrain_classes(run).to_numpy()[positions]
    return pd.DataFrame(
        {"pretrain_id": ids[order], "class": classes[order], "score": scores[order]}
    )


def region_totals(run: Run, selection: Selection, table: pd.DataFrame) -> dict:
    """The selection's summed score (its first-order influence on the test), split into its
    helpful and harmful parts, and its share of the test's total |score| (None without
    scores)."""
    known = table["score"].dropna()
    total = data.total_influence(run, selection.scenario, selection.test_id)
    return {
        "summed": float(known.sum()),
        "helpful": float(known.clip(lower=0).sum()),
        "harmful": float(known.clip(upper=0).sum()),
        "share": float(known.abs().sum()) / total if total else None,
    }


def selection_csv(run: Run, table: pd.DataFrame) -> str:
    """The selection as CSV, text included (read when the button is clicked)."""
    table = table.head(EXPORT_ROWS)
    if run.has_text:
        rows = data.examples(run, table["pretrain_id"])
        table = table.assign(text=rows["text"].reindex(table["pretrain_id"]).to_numpy())
    return table.to_csv(index=False)


def _rows_shown(run: Run, table: pd.DataFrame) -> pd.DataFrame:
    """The first rows of a table of examples, with their input (thumbnail or text)."""
    shown = table.head(SELECTION_ROWS).copy()
    rows = data.examples(run, shown["pretrain_id"]).reindex(shown["pretrain_id"])
    if run.has_images:
        shown["input"] = [png_data_uri(p, upscale_to=32) for p in rows["image_png"]]
    else:
        shown["input"] = rows["text"].fillna("").astype(str).str.slice(0, 160).to_numpy()
    return shown


def _example_table(run: Run, shown: pd.DataFrame, key: str) -> None:
    """A table of examples; clicking a row opens that example below the map."""
    st.dataframe(
        shown,
        key=key,
        hide_index=True,
        height=min(420, 38 + 35 * len(shown)),
        on_select=lambda: _open_row(key, shown),
        selection_mode="single-row",
        column_order=["pretrain_id", "input", "class", "score"],
        column_config={
            "pretrain_id": st.column_config.NumberColumn("id", format="#%d"),
            "input": st.column_config.ImageColumn("input")
            if run.has_images
            else st.column_config.TextColumn("input", width="large"),
            "score": st.column_config.NumberColumn("score", format="%+.3g"),
        },
    )


def _open_row(key: str, shown: pd.DataFrame) -> None:
    rows = st.session_state[key].selection.rows
    if rows:
        st.query_params["example"] = str(int(shown["pretrain_id"].iloc[rows[0]]))


def selection_panel(run: Run, selection: Selection, chosen) -> None:
    """The examples inside the box or lasso: count, summed score, list, CSV, zoom."""
    box, lasso = _region(chosen)
    if box is None and lasso is None:
        return
    positions = data.region_positions(run, box=box, lasso=lasso)
    heading(f"Selection: {len(positions):,} pretraining examples")
    if len(positions) == 0:
        caption("No pretraining example lies inside the selection.")
        return
    table = region_table(run, selection, positions)
    totals = region_totals(run, selection, table)
    columns = st.columns(4)
    columns[0].metric("summed score", format_score(totals["summed"]), border=True)
    columns[1].metric("helpful part", format_score(totals["helpful"]), border=True)
    columns[2].metric("harmful part", format_score(totals["harmful"]), border=True)
    if totals["share"] is not None:
        columns[3].metric("share of total |score|", f"{totals['share']:.1%}", border=True)
    source = "every score" if run.has_scores else "the top-k lists only (no scores.parquet)"
    caption(
        f"Summed score = first-order estimate of how test {selection.test_id}'s loss would "
        f"change if all {len(positions):,} were removed (from {source}). Strongest |score| "
        f"first; click a row to open it."
    )
    _example_table(run, _rows_shown(run, table), key="map_selection_table")
    left, middle, right = st.columns([1.3, 1.3, 3])
    left.download_button(
        "Download the selection (CSV)",
        lambda: selection_csv(run, table),
        file_name=f"msif_{run.name}_{selection.scenario}_test{selection.test_id}_selection.csv",
        mime="text/csv",
        icon=":material/download:",
    )
    x, y = run.pretrain["umap_x"].to_numpy(), run.pretrain["umap_y"].to_numpy()
    zoom = raster.full_extent(
        x[positions].astype(np.float64), y[positions].astype(np.float64), pad=0.05
    )
    middle.button(
        "Zoom into the selection",
        on_click=state.set_url,
        args=("zoom", zoom.text()),
        icon=":material/zoom_in:",
    )


def _search_ids(run: Run, query: str) -> tuple[list[int], int, str]:
    """The examples a search finds: an id (`123` or `#123`) or, in a text run, the texts that
    contain `query`; with how many match and what was searched."""
    text = query.strip()
    number = text.removeprefix("#")
    if number.isdigit():
        pretrain_id = int(number)
        found = [pretrain_id] if pretrain_id in run.pretrain.index else []
        return found, len(found), f"id #{pretrain_id}"
    if not run.has_text:
        return [], 0, "ids only: this run's pretraining examples have no text"
    ids, total = data.search_text(run, text, SEARCH_ROWS)
    return ids, total, "their texts"


def search_panel(run: Run, selection: Selection) -> None:
    """Find pretraining examples by id or by words in their text, and open them."""
    query = state.param("find") or ""
    st.session_state["find_pick"] = query
    st.text_input(
        "Find pretraining examples",
        key="find_pick",
        placeholder="an id such as 1234, or words from the text",
        on_change=_on_find,
    )
    if not query.strip():
        return
    ids, total, where = _search_ids(run, query)
    if not ids:
        caption(f'No pretraining example matches "{query}" (searched {where}).')
        return
    listed = f"; the first {len(ids)} found are listed, largest |score| first"
    caption(
        f'{total:,} pretraining examples match "{query}" (searched {where})'
        f"{listed if total > len(ids) else ''}. Click a row to open it."
    )
    positions = run.store.positions(ids)
    table = region_table(run, selection, positions)
    _example_table(run, _rows_shown(run, table), key="map_search_table")


def _on_find() -> None:
    query = (st.session_state.get("find_pick") or "").strip()
    state.set_url("find", query or None)
    if query.removeprefix("#").isdigit():  # an id opens that example at once
        state.set_url("example", query.removeprefix("#"))


def detail(run: Run, selection: Selection, pretrain_id: int) -> None:
    """One pretraining example in full, with its score and rank for the selected test."""
    row = data.example(run, pretrain_id)
    values = data.score_values(run, selection.scenario, selection.test_id)
    position = int(run.store.positions([pretrain_id])[0])
    found = data.top_rank(run, selection.scenario, selection.test_id, pretrain_id)
    top = (
        data.top_list(run, selection.scenario, selection.test_id, found[1], run.top_k)
        if found
        else None
    )
    if values is not None and np.isfinite(values[position]):
        score = format_score(float(values[position]))
    elif found:
        score = format_score(float(top.loc[top["pretrain_id"] == pretrain_id, "score"].iloc[0]))
    else:
        score = "not stored (outside the top-k, and the run has no scores.parquet)"
    rank = f"rank {found[0]} {found[1]}" if found else "not in the top-k lists"
    st.html(
        '<div class="msif-hero">'
        + example_body(row, css_class="msif-big")
        + f"<div><h2>#{pretrain_id}</h2><div class='msif-sub'>pretraining example · "
        + f"{html.escape(label_text(row))}</div>"
        + "<div class='msif-facts'><div class='msif-fact'><div class='k'>score for test "
        + f"{selection.test_id}</div><div class='v'>{html.escape(score)}</div></div>"
        + "<div class='msif-fact'><div class='k'>position</div>"
        + f"<div class='v'>{html.escape(rank)}</div>"
        + "</div></div></div></div>"
    )


def render(run: Run, selection: Selection) -> None:
    whole, zoom = extent(run)
    if state.param("zoom") is not None and zoom is None:
        note("warning", f"zoom={state.param('zoom')} is not x0,x1,y0,y1: showing the whole map.")
    view = zoom or whole
    if run.has_scores:
        caption(
            f"Every pretraining example, coloured by its score for test {selection.test_id} "
            "(green helpful, red harmful, grey near zero; each pixel shows the mean of the "
            "examples in it). Drag to zoom in (the map is redrawn at the new scale; double-click "
            "for the whole map), or pick box or lasso select in the plot's toolbar to list the "
            "examples inside. Click a test (open diamond) to select it, or a highlighted example "
            "to open it."
        )
    else:
        note(
            "info",
            "This run has no scores.parquet: the background is coloured by class, not by "
            "score; only the top-k lists are highlighted.",
        )
    key = f"map_{view.text()}"
    slot = st.empty()
    if not st.session_state.get(PLOTLY_SHOWN):
        # a page that has not drawn a chart yet: a blank one at once makes the browser fetch
        # and start plotly (a few MiB of JavaScript) while the raster is drawn here; the map
        # then takes its place. Not on later reruns, where it would blank the map shown
        slot.plotly_chart(blank_figure(), config={"displayModeBar": False}, theme=None)
    try:
        fig = figure(run, selection, view)
    except Exception:  # e.g. scores naming an unknown example: the page says so, without a chart
        slot.empty()
        raise
    event = slot.plotly_chart(
        fig,
        key=key,
        on_select=lambda: _on_select(key),
        selection_mode=("points", "box", "lasso"),
        config={"displaylogo": False, "modeBarButtonsToRemove": ["autoScale2d"]},
        theme=None,  # the figure sets its own colours; streamlit's theme would restyle them
    )
    st.session_state[PLOTLY_SHOWN] = True
    ZOOM_HOOK(key=ZOOM_KEY, on_zoom_change=_on_zoom, height=0)
    if zoom is not None:
        left, right = st.columns([4, 1])
        left.caption(f"Zoomed to x {zoom.x0:.3g} … {zoom.x1:.3g}, y {zoom.y0:.3g} … {zoom.y1:.3g}.")
        right.button(
            "Show the whole map",
            on_click=state.set_url,
            args=("zoom", None),
            icon=":material/zoom_out_map:",
        )
    selection_panel(run, selection, event.selection)
    search_panel(run, selection)
    if selection.example is not None:
        detail(run, selection, selection.example)
