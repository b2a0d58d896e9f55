"""Nothing leaves the machine: OpenVINO's and NNCF's usage telemetry is cut off in the processes repblocks runs.

Both report usage to Google Analytics through the ``openvino_telemetry`` package, by default:
NNCF when it is imported, OpenVINO's model conversion when it converts (openvino-telemetry 2025.2,
nncf 2.x). That package's only opt-out is a consent file in the user's home (``opt_in_out
--opt_out`` writes ``~/intel/openvino_telemetry``), which is the user's choice to make for every
tool, not ours; it has no environment variable. Both callers fall back to a stub that sends nothing
when the package cannot be imported (NNCF: "openvino_telemetry package not found. No telemetry will
be sent"; OpenVINO: ``openvino.tools.ovc.telemetry_stub``), so :func:`disable_telemetry` makes it
unimportable in this process. ``repblocks.train`` and ``repblocks.deploy`` call it when imported,
before anything imports OpenVINO or NNCF; the core never imports either.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["TELEMETRY_PACKAGE", "disable_telemetry"]

log = logging.getLogger(__name__)

TELEMETRY_PACKAGE = "openvino_telemetry"


def disable_telemetry() -> None:
    """Keep OpenVINO and NNCF from sending usage telemetry from this process; safe to call more than once.

    Effective when called before either is imported; if one already loaded the telemetry package,
    it is left alone and a warning says how to opt out for good.
    """
    if TELEMETRY_PACKAGE not in sys.modules:
        # A None entry makes `import openvino_telemetry` raise ImportError: both callers then use their stubs.
        sys.modules[TELEMETRY_PACKAGE] = None
    elif sys.modules[TELEMETRY_PACKAGE] is not None:
        log.warning(
            "OpenVINO's telemetry was loaded before repblocks could turn it off in this process; "
            "to opt out on this machine for good, run: opt_in_out --opt_out"
        )
