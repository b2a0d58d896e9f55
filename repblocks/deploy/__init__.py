"""Deployment (extra ``[deploy]``: onnx, onnxruntime, rich, matplotlib): load a network, convert it,
verify it, export it, time it and report. :mod:`repblocks.deploy.pipeline` reads those steps top to
bottom, one module each (``sources``, ``convert``, ``verify``, ``export``, ``speed``, ``report``), after
the checks of ``config`` (settings), ``runtime`` (device) and ``outputs`` (out_dir, written all or
nothing); ``preprocessing`` says how the model's images are prepared, ``engines`` what a backend runs.
Entry point: ``deploy.py`` at the repository root.

Never imports :mod:`repblocks.train`; what both need (checkpoint reading, data sets, numerics) is in the core.
"""
