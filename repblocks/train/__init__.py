"""Training (extra ``[train]``: Lightning, torchmetrics, timm): the LightningModule, data modules, losses,
optimizer groups and schedules, callbacks. Entry point: ``train.py`` at the repository root.

Never imports :mod:`repblocks.deploy`; what both need (checkpoint reading, data sets, numerics) is in the core.
Importing it turns off OpenVINO's and NNCF's usage telemetry in this process (:mod:`repblocks.offline`).
"""

from repblocks.offline import disable_telemetry

# OpenVINO and NNCF (the [openvino] extra, imported lazily below) would report usage to Google Analytics.
disable_telemetry()
