"""The selected prediction: its input shown large, true label vs prediction, confidence, loss."""

from __future__ import annotations

import html

import streamlit as st

from explorer import data
from explorer.data import Run
from explorer.render import example_body, label_text, note
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


def solve_details(manifest: dict, scenario: str) -> str:
    """What the manifest's solver entries say about the solves behind `scenario` that missed
    their tolerance (residual reached, tolerance), or "" when it says nothing usable."""
    solver = manifest.get("solver")
    if not isinstance(solver, dict):
        return ""
    parts = []
    for name in (scenario, "pretrain"):
        info = solver.get(name)
        if not isinstance(info, dict):
            continue
        residual, tolerance = info.get("max_relative_residual"), info.get("tolerance")
        numbers = all(isinstance(v, (int, float)) for v in (residual, tolerance))
        if numbers and residual > tolerance:
            which = "pretraining" if name == "pretrain" else f"{name} finetuning"
            parts.append(
                f"the {which} solve ({info.get('solver', 'unknown solver')}) reached a relative "
                f"residual of {residual:.3g} against a tolerance of {tolerance:g}"
            )
    return "; ".join(parts)


def unconverged_text(run: Run, selection: Selection) -> str | None:
    """The warning for a test whose influence solve did not converge (listed in the manifest's
    unconverged_tests by runs made with --allow-unconverged), or None."""
    if selection.test_id not in run.unconverged.get(selection.scenario, frozenset()):
        return None
    text = (
        f"The influence solve did not converge for test {selection.test_id} in the "
        f"{selection.scenario} scenario, so its scores are unreliable (the run was made with "
        "--allow-unconverged)"
    )
    details = solve_details(run.manifest, selection.scenario)
    return f"{text}: {details}." if details else f"{text}."


def unconverged_banner(run: Run, selection: Selection) -> None:
    """A warning under the prediction when its influence solve did not converge."""
    text = unconverged_text(run, selection)
    if text:
        note("warning", text)
