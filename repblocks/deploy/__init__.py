"""Deployment (extra ``[deploy]``: onnx, onnxruntime, rich, matplotlib): load a network, convert it,
verify it, export it, time it and report. :mod:`repblocks.deploy.pipeline` reads those steps top to
bottom, one module each (``sources``, ``convert``, ``verify``, ``export``, ``speed``, ``report``), after
the checks of ``config`` (settings), ``runtime`` (device) and ``outputs`` (out_dir, written all or
nothing); ``preprocessing`` says how the model's images are prepared, ``engines`` what a backend runs.
Entry point: ``deploy.py`` at the repository root.

Never imports :mod:`repblocks.train`; what both need (checkpoint reading, data sets, numerics) is in the core.
Importing it turns off OpenVINO's and NNCF's usage telemetry in this process (:mod:`repblocks.offline`).
"""

from repblocks.offline import disable_telemetry

# OpenVINO and NNCF (the [openvino] extra, imported lazily below) would report usage to Google Analytics.
disable_telemetry()
