"""The convert stage: the plain deploy form of a loaded network, and how long the conversion took."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from torch import nn

from repblocks.convert import switch_to_deploy
from repblocks.deploy.sources import DEPLOY_FORM, Network

__all__ = ["Conversion", "convert"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conversion:
    """The deploy form of a network and how it was obtained."""

    plain: nn.Module  # the deploy form, eval mode, float32 on the CPU
    seconds: float  # time in switch_to_deploy; 0 when there was nothing to convert
    already_deployed: bool  # the weights were in deploy form: ``plain`` is the loaded model itself

    @property
    def note(self) -> str:
        if self.already_deployed:
            return "the weights were already in deploy form: nothing to convert"
        return f"converted with switch_to_deploy in {self.seconds:.3f} s"


def convert(network: Network) -> Conversion:
    """``switch_to_deploy`` on a copy of ``network.model``; a network loaded in deploy form is passed through."""
    if network.form == DEPLOY_FORM:
        log.info("%s: %s", network.name, "the weights are already in deploy form")
        return Conversion(network.model, 0.0, already_deployed=True)
    start = time.perf_counter()
    plain = switch_to_deploy(network.model)
    seconds = time.perf_counter() - start
    log.info("converted %s in %.3f s", network.name, seconds)
    return Conversion(plain, seconds, already_deployed=False)
