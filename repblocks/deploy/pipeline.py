"""The deploy pipeline, top to bottom: load -> convert -> verify -> export -> time -> report.

``run_deploy(DeployConfig.from_dict({...}))`` first checks every setting: the config checks its
types, ranges and names when it is built (:mod:`~repblocks.deploy.config`); here the device and
``out_dir`` are checked (:mod:`~repblocks.deploy.outputs`). Nothing has been loaded or written yet.
Then each stage is one function of its own module:

1. load the network (:mod:`~repblocks.deploy.sources`): a train.py checkpoint, deploy.py's own
   ``model.safetensors``, a weights file with a model name, a registered model with random weights
   and BN statistics, or a torchvision classifier; ``weights_only=True`` always. One image of each
   input shape the run will use goes through it first (:func:`~repblocks.deploy.verify.check_inputs`);
2. convert it with ``switch_to_deploy`` (:mod:`~repblocks.deploy.convert`); weights loaded in
   deploy form are passed through;
3. verify the deploy form against the train form (:mod:`~repblocks.deploy.verify`); over
   tolerance, stop with :class:`repblocks.errors.UserError` before anything is written;
4. with ``quantize=int8``, quantize the deploy form to int8 and gate it on validation accuracy
   (:mod:`~repblocks.deploy.quantize`); no engine within ``quantize.max_drop``: stop, nothing written;
5. export the deploy form at the model's own input size, and the int8 models that passed
   (:mod:`~repblocks.deploy.export`);
6. time train vs deploy form per backend and dtype at ``bench.image_size``, int8 beside them
   (:mod:`~repblocks.deploy.speed`);
7. report: ``report.json``, ``report.md``, a plot and the resolved ``config.json`` (:mod:`~repblocks.deploy.report`).

Stages 5 to 7 write into a staging folder that replaces ``out_dir`` only when all of them have
succeeded: a failure or an interrupt leaves ``out_dir`` as it was.

With ``models=[...]``, :func:`run_speed_table` instead times many models' deploy forms (and
torchvision models before and after Conv+BN folding) side by side: the RepVGG paper's speed table.
The library never imports Hydra; ``deploy.py`` turns its config into the plain dict this module takes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from torch import nn

from repblocks.deploy.config import BenchConfig, DeployConfig, ExportConfig, QuantizeConfig, VerifyConfig
from repblocks.deploy.convert import Conversion, convert
from repblocks.deploy.engines import by_format, engine
from repblocks.deploy.engines.base import runtime_output
from repblocks.deploy.export import export_all, export_int8
from repblocks.deploy.outputs import check_out_dir, check_out_dir_space, remove_killed_runs_staging, staged_output
from repblocks.deploy.preprocessing import DEFAULT_IMAGE_SIZE, override
from repblocks.deploy.quantize import Quantization, quantize
from repblocks.deploy.report import deploy_report, speed_report, write_reports, write_speed_table
from repblocks.deploy.runners import int8_runners
from repblocks.deploy.runtime import check_memory, resolve_device
from repblocks.deploy.sources import TORCHVISION, Network, check_model_names, load_network
from repblocks.deploy.speed import time_forms, time_models
from repblocks.deploy.verify import Verification, check_inputs, not_compared, verify
from repblocks.errors import UserError
from repblocks.signals import check_interrupted
from repblocks.threads import ThreadChoice, choose_threads, use_threads

__all__ = [
    "BenchConfig",
    "DeployConfig",
    "ExportConfig",
    "QuantizeConfig",
    "VerifyConfig",
    "run_deploy",
    "run_speed_table",
]

log = logging.getLogger(__name__)


def run_deploy(config: DeployConfig) -> dict:
    """Load, convert, verify, export, time and report; return the report (also in ``out_dir``).

    Raises:
        UserError: Bad input (the message says what exists), or the deploy form fails its checks.
            ``out_dir`` is left as it was unless the whole run succeeds.
    """
    if config.models:
        return run_speed_table(config)
    device = resolve_device(config.bench.device)
    out_dir = check_out_dir(config.out_dir)
    remove_killed_runs_staging(out_dir)  # before the space check: what they hold is free again
    bench = config.bench.for_device(device.type)
    config = _with_executorch_int8(config)
    with runtime_output("checking the engines"):  # the engines' imports write C++ notes too (ExecuTorch's cpuinfo)
        _check_extras(config)
    choice = _choose_threads(bench)
    log.info("threads: %s", choice.note)
    stages = _Stages()
    with use_threads(choice.threads):
        network = load_network(
            ckpt=config.ckpt, model=config.model, source=config.source, num_classes=config.num_classes, seed=config.seed
        )
        network.preprocessing = override(network.preprocessing, config.preprocessing, in_chans=network.in_chans)
        # The two input sizes of the run, the timed one and the model's own: each must fit and go through the model.
        timed_shape = _timed_shape(network, bench)
        check_memory(batch_sizes=[*bench.batch_sizes, config.verify.batch_size], image_shape=timed_shape, device=device)
        check_memory(batch_sizes=[config.verify.batch_size], image_shape=network.input_shape, device=device)
        check_inputs(network, [timed_shape, network.input_shape], setting="bench.image_size")
        stages.done("load", network.name)

        conversion = convert(network)
        stages.done("convert")
        needed = _output_bytes(conversion.plain, config)
        check_out_dir_space(out_dir, needed)  # a full disk: one line now, not a C++ stream error after the work
        verification = _verify(network, conversion, config, device, bench, [network.input_shape, timed_shape])
        stages.done("verify")
        with runtime_output("the quantize stage"):
            quantization = _quantize(network, conversion, config)
        if quantization is not None:
            stages.done("quantize")

        with staged_output(out_dir, needed=needed) as staging:
            with runtime_output("the export stage"):
                exports, not_converted = export_all(
                    network,
                    conversion.plain,
                    into=staging,
                    out_dir=out_dir,
                    export=config.export,
                    verify=config.verify,
                    seed=config.seed,
                )
                prepared = None
                if quantization is not None:
                    exports |= export_int8(
                        network,
                        quantization.passed,
                        into=staging,
                        out_dir=out_dir,
                        verify=config.verify,
                        seed=config.seed,
                        layout=config.export.layout,
                    )
                    prepared = int8_runners(quantization.passed, device=device, backends=bench.backends)
            not_written = f"; not converted: {', '.join(not_converted)}" if not_converted else ""
            stages.done("export", (", ".join(exports) or "nothing") + not_written)
            with runtime_output("the time stage"):
                timing = time_forms(
                    _forms(network, conversion), device=device, bench=bench, image_shape=timed_shape, prepared=prepared
                )
            stages.done("time", f"{len(timing.rows)} figures")
            report = deploy_report(
                network=network,
                conversion=conversion,
                verification=verification,
                exports=exports,
                not_converted=not_converted,
                timing=timing,
                device=device,
                bench=bench,
                timed_shape=timed_shape,
                quantization=quantization,
                threads=choice,
            )
            resolved = dataclasses.replace(config, bench=bench, out_dir=str(out_dir))
            report["files"] = write_reports(report, staging, out_dir=out_dir, config=resolved)
        stages.done("report")
    return report


def run_speed_table(config: DeployConfig) -> dict:
    """Time many models' deploy forms side by side (the paper's speed table); torchvision ones also unfolded."""
    if config.ckpt or config.model or config.source:
        raise UserError("models=[...] times the models it names: leave ckpt, model and source unset")
    check_model_names(config.models)
    device = resolve_device(config.bench.device)
    out_dir = check_out_dir(config.out_dir)
    remove_killed_runs_staging(out_dir)  # before the space check: what they hold is free again
    # The paper's batch of 128 on a GPU; on 2 CPU cores that would take an hour.
    bench = config.bench.for_device(device.type, batch_sizes=(128,) if device.type == "cuda" else (8,))
    image_size = bench.image_size or DEFAULT_IMAGE_SIZE
    image_shape = (3, image_size, image_size)
    check_memory(batch_sizes=bench.batch_sizes, image_shape=image_shape, device=device)
    choice = _choose_threads(bench)
    log.info("threads: %s", choice.note)
    stages = _Stages()
    with use_threads(choice.threads):
        models = {}
        for name in config.models:
            models.update(_speed_table_entries(name, image_shape, config))
        stages.done("load, convert and verify", f"{len(models)} models")
        with runtime_output("the time stage"):
            timing = time_models(models, device=device, bench=bench, image_shape=image_shape)
        stages.done("time", f"{len(timing.rows)} figures")
        report = speed_report(timing=timing, device=device, bench=bench, image_shape=image_shape, threads=choice)
        with staged_output(out_dir) as staging:
            resolved = dataclasses.replace(config, bench=bench, out_dir=str(out_dir))
            report["files"] = write_speed_table(report, staging, out_dir=out_dir, config=resolved)
    return report


def _with_executorch_int8(config: DeployConfig) -> DeployConfig:
    """With ``export.formats=[...,executorch]`` and ``quantize=int8``, ExecuTorch is one of the int8 engines too."""
    engines = config.quantize.engines
    if not config.quantize.precision or "executorch" not in config.export.formats or "executorch" in engines:
        return config
    return dataclasses.replace(config, quantize=dataclasses.replace(config.quantize, engines=(*engines, "executorch")))


class _Stages:
    """Logs a line as each stage ends, with its seconds: progress that a log file or a pipe shows too.

    A stage's end is also where a signal that a library swallowed during it stops the run (:mod:`repblocks.signals`).
    """

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def done(self, stage: str, what: str = "") -> None:
        check_interrupted()
        now = time.perf_counter()
        log.info("%s done in %.1f s%s", stage, now - self._last, f": {what}" if what else "")
        self._last = now


def _check_extras(config: DeployConfig) -> None:
    """Settings that cannot be met stop here, before anything is loaded: an engine not installed, no such image folder."""
    settings = config.quantize
    for name, path in (("calibration", settings.calibration), ("validation", settings.validation)):
        if settings.precision and path is not None and not Path(path).expanduser().is_dir():
            raise UserError(f"quantize.{name}: {path} is not a folder of images")
    if settings.precision and settings.class_names is not None:
        if settings.validation is None:
            raise UserError("quantize.class_names maps the class folders of quantize.validation=DIR: pass that too")
        if not Path(settings.class_names).expanduser().is_file():
            raise UserError(f"quantize.class_names: {settings.class_names} is not a file")
    for fmt in config.export.formats:
        exporter = by_format(fmt).load()
        reason = exporter.missing()
        if reason:
            raise UserError(f"export.formats=[{fmt}] needs {exporter.title}, but {reason}")
    if config.quantize.precision and len(config.quantize.engines) == 1:
        (name,) = config.quantize.engines
        quantizer = engine(name)
        reason = quantizer.missing()
        if reason:
            raise UserError(f"quantize.engines=[{name}] needs {quantizer.title}, but {reason}")


def _choose_threads(bench: BenchConfig) -> ThreadChoice:
    """``bench.threads``, else ``OMP_NUM_THREADS``, else (on the CPU, when anything is timed) as many as the cores
    other processes leave free, else torch's own count."""
    timed_on_the_cpu = bench.batch_sizes and not bench.device.startswith("cuda")
    return choose_threads(bench.threads, setting="bench.threads", measure=bool(timed_on_the_cpu))


def _output_bytes(plain: nn.Module, config: DeployConfig) -> int:
    """About how many bytes the exports take: the deploy form's weights once per format, a quarter per int8 file."""
    weights = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
    int8_files = len(config.quantize.engines) if config.quantize.precision else 0
    return weights * len(config.export.formats) + weights * int8_files // 4


def _quantize(network: Network, conversion: Conversion, config: DeployConfig) -> Quantization | None:
    """int8 models gated on accuracy, when ``quantize.precision=int8``; None otherwise."""
    if config.quantize.precision is None:
        return None
    return quantize(network, conversion.plain, config.quantize, seed=config.seed)


def _timed_shape(network: Network, bench: BenchConfig) -> tuple[int, int, int]:
    """What is timed: ``bench.image_size`` when set, else the model's own input size."""
    if bench.image_size is None:
        return network.input_shape
    return network.in_chans, bench.image_size, bench.image_size


def _verify(
    network: Network,
    conversion: Conversion,
    config: DeployConfig,
    device: torch.device,
    bench: BenchConfig,
    shapes: list[tuple[int, int, int]],
) -> Verification:
    if conversion.already_deployed:
        return not_compared("the weights came in deploy form: there is no train form to compare with", config.verify)
    return verify(
        network,
        conversion.plain,
        device=device,
        image_shapes=shapes,
        dtypes=bench.dtypes,
        settings=config.verify,
        seed=config.seed,
    )


def _forms(network: Network, conversion: Conversion) -> dict[str, nn.Module]:
    """The forms to time: train and deploy, or the deploy form alone when the weights came in it."""
    if conversion.already_deployed:
        return {"deploy": conversion.plain}
    return {"train": network.model, "deploy": conversion.plain}


def _speed_table_entries(name: str, image_shape: tuple[int, int, int], config: DeployConfig) -> dict[str, nn.Module]:
    """``{name: deploy form}``; a torchvision model also as it is (``{name: original, name folded: folded}``)."""
    source = name if name.startswith(TORCHVISION) else None
    network = load_network(model=None if source else name, source=source, seed=config.seed)
    check_inputs(network, [image_shape], setting="bench.image_size")
    plain = convert(network).plain
    # Two images on the CPU: the conversion is what is checked here, cheaply, before anything is timed.
    settings = dataclasses.replace(config.verify, batch_size=2, real_batches=0)
    cpu = torch.device("cpu")
    verify(
        network, plain, device=cpu, image_shapes=[image_shape], dtypes=("fp32",), settings=settings, seed=config.seed
    )
    if source:
        return {name: network.model, f"{name} folded": plain}
    return {name: plain}
