"""The selected prediction: its input shown large, true label vs prediction, confidence, loss."""

from __future__ import annotations

import html

import streamlit as st

from explorer import data
from explorer.data import Run
from explorer.render import example_body, label_text
from explorer.state import Selection


def _fact(name: str, value: str, css: str = "") -> str:
    return (
        f'<div class="msif-fact"><div class="k">{name}</div>'
        f'<div class="v {css}">{value}</div></div>'
    )


def render(run: Run, selection: Selection) -> None:
    row = run.test.loc[selection.test_id]
    pred = data.prediction(run, selection.scenario, selection.test_id)
    facts = [_fact("True label", html.escape(label_text(row)))]
    if pred is None:
        verdict = "no prediction in this scenario"
    else:
        correct = bool(pred["correct"])
        facts += [
            _fact(
                "Prediction",
                html.escape(label_text(pred, "pred_name", "pred")) + (" ✓" if correct else " ✗"),
                "msif-ok" if correct else "msif-bad",
            ),
            _fact("Confidence", f"{float(pred['confidence']):.1%}"),
            _fact("Test loss", f"{float(pred['loss']):.3f}"),
        ]
        verdict = "correct prediction" if correct else "wrong prediction"
    scenario = html.escape(selection.scenario.upper())
    st.html(
        '<div class="msif-hero">'
        + example_body(row, css_class="msif-big")
        + f"<div><h2>Test {selection.test_id}</h2>"
        + f'<div class="msif-sub">{scenario} scenario · {verdict} · run '
        + f"{html.escape(run.name)}</div>"
        + '<div class="msif-facts">'
        + "".join(facts)
        + "</div></div></div>"
    )
