"""Nothing leaves the machine: the inference engines' telemetry is cut off in the processes repblocks runs.

What phones home, found with a logging proxy (``python -m benchmarks.network_capture``), and the switch:

* onnxruntime (1.29+ on Linux and macOS; 1.32 here): its C++ library uploads events to
  ``mobile.events.data.microsoft.com`` from a thread of its own (one session held open 70 s: 4
  ``CONNECT`` requests, at about 11, 16, 25 and 46 s) and keeps a device id and an event cache under
  ``~/.cache/Microsoft/DeveloperTools/.onnxruntime/``. ``onnxruntime.disable_telemetry_events()``
  does not stop it (the uploader starts with the library's environment, before that call can be
  made). ``ORT_DISABLE_TELEMETRY=1``, read when the library creates its environment (on import),
  does: no uploader, no device id, no request. A Python audit hook sees none of this (the socket is
  opened in C++), hence the proxy;
* OpenVINO and NNCF report usage to Google Analytics through the ``openvino_telemetry`` package, by
  default: NNCF when it is imported, OpenVINO's model conversion when it converts (openvino-telemetry
  2025.2, nncf 2.x/3.x). That package's only opt-out is a consent file in the user's home (``opt_in_out
  --opt_out`` writes ``~/intel/openvino_telemetry``), which is the user's choice to make for every
  tool, not ours; it has no environment variable. Both callers fall back to a stub that sends nothing
  when the package cannot be imported (NNCF: "openvino_telemetry package not found. No telemetry will
  be sent"; OpenVINO: ``openvino.tools.ovc.telemetry_stub``), so :func:`disable_telemetry` makes it
  unimportable in this process.

ExecuTorch, LiteRT and coremltools sent nothing in the same capture. ``repblocks.train`` and
``repblocks.deploy`` call :func:`disable_telemetry` when imported, and deploy.py and predict.py before
anything else, so before any engine is imported; the core never imports an engine.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["ENVIRONMENT", "TELEMETRY_PACKAGE", "disable_telemetry"]

log = logging.getLogger(__name__)

TELEMETRY_PACKAGE = "openvino_telemetry"
# Read by an engine's C++ library once, when it loads: set in this process's environment (and so its children's).
ENVIRONMENT = {"ORT_DISABLE_TELEMETRY": "1"}


def disable_telemetry() -> None:
    """Keep onnxruntime, OpenVINO and NNCF from sending telemetry from this process; safe to call more than once.

    Effective when called before they are imported; an engine that already loaded its telemetry is
    left alone, and a warning says so (and how to opt out for good where there is a way).
    """
    for name, value in ENVIRONMENT.items():
        if os.environ.get(name) != value and "onnxruntime" in sys.modules:
            log.warning(
                "onnxruntime was imported before repblocks could turn its telemetry off in this process; "
                "set %s=%s in the environment to turn it off for good",
                name,
                value,
            )
        os.environ[name] = value
    if TELEMETRY_PACKAGE not in sys.modules:
        # A None entry makes `import openvino_telemetry` raise ImportError: both callers then use their stubs.
        sys.modules[TELEMETRY_PACKAGE] = None
    elif sys.modules[TELEMETRY_PACKAGE] is not None:
        log.warning(
            "OpenVINO's telemetry was loaded before repblocks could turn it off in this process; "
            "to opt out on this machine for good, run: opt_in_out --opt_out"
        )
