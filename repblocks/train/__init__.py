"""Training (extra ``[train]``: Lightning, torchmetrics, timm): the LightningModule, data modules, losses,
optimizer groups and schedules, callbacks. Entry point: ``train.py`` at the repository root.

Never imports :mod:`repblocks.deploy`; what both need (checkpoint reading, data sets, numerics) is in the core.
"""
