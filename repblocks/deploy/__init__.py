"""Deployment (extra ``[deploy]``: onnx, onnxruntime, rich, matplotlib): load a network, convert it,
verify it, export it, time it and report. :mod:`repblocks.deploy.pipeline` reads those steps top to
bottom; entry point: ``deploy.py`` at the repository root.

Never imports :mod:`repblocks.train`; what both need (checkpoint reading, data sets, numerics) is in the core.
"""
