"""Deployment (extra ``[deploy]``: onnx, onnxruntime, rich, matplotlib): load a network, convert it,
verify it, export it, time it and report. :mod:`repblocks.deploy.pipeline` reads those steps top to
bottom, one module each (``sources``, ``convert``, ``verify``, ``export``, ``speed``, ``report``), after
the checks of ``config`` (settings), ``runtime`` (device) and ``outputs`` (out_dir, written all or
nothing); ``preprocessing`` says how the model's images are prepared. Each engine (onnxruntime,
OpenVINO, ExecuTorch, ...) is one module of ``engines``, listed once in its registry; ``runners`` says what
a timed backend runs.
Entry point: ``deploy.py`` at the repository root. :class:`Predictor` (``predict``, entry point
``predict.py``) classifies images with any file deploy.py wrote.

Never imports :mod:`repblocks.train`; what both need (checkpoint reading, data sets, numerics) is in the core.
Importing it turns off onnxruntime's, OpenVINO's and NNCF's telemetry in this process (:mod:`repblocks.offline`):
every engine module is under this package, so no engine is imported before the switch is set.
"""

from repblocks.offline import disable_telemetry

# onnxruntime would upload events to Microsoft, OpenVINO and NNCF report usage to Google Analytics: each engine
# module is imported under this package, so after this call.
disable_telemetry()


def __getattr__(name: str):
    # Imported when asked for: importing repblocks.deploy (for its config, say) loads no engine.
    if name == "Predictor":
        from repblocks.deploy.predict import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
