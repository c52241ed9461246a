"""The msif explorer: a Streamlit app over a run directory (docs/design.md sections 1 and 5).

Start it with `msif explore RUN_DIR_OR_RUNS_ROOT` or `python -m explorer RUN_DIR`.
"""
