"""The clinician dashboard: a Streamlit app on top of `medseg_jax.Predictor`.

    python -m medseg_jax.dashboard --workdir=runs/x [--workdir=runs/y]
        [--ensemble] [--port 8501]

`app.py` is the Streamlit script; everything it shows is computed by the
modules beside it, which do not import Streamlit (so they are unit-tested):
`cli` (arguments, checks), `loading` (models), `uploads` (reading files),
`views` (thresholds, overlays, maps) and `results` (areas, Dice, CSV, ZIP).
"""
