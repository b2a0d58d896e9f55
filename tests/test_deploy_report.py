"""What a deploy run tells a person: a one-line headline, validation counts as training's, a plot that reads alike across runs."""

from pathlib import Path

import pytest
from matplotlib.patches import Rectangle
from PIL import Image

from repblocks.datasets import DigitsData
from repblocks.deploy.config import DeployConfig, VerifyConfig
from repblocks.deploy.engines import BACKENDS
from repblocks.deploy.pipeline import run_deploy
from repblocks.deploy.plot import throughput_figure, write_throughput_plot
from tests.helpers import write_untrained_run


def _row(form: str, backend: str, throughput: float, batch_size: int = 1) -> dict:
    return {
        "form": form,
        "backend": backend,
        "dtype": "fp32",
        "batch_size": batch_size,
        "throughput": throughput,
        "ratio_to_train": None,
        "ratio_to_train_eager": None,
    }


def _report(rows: list[dict], **extra) -> dict:
    return {"model": "repvgg_tiny", "device": "cpu (2 threads)", "image_shape": [3, 32, 32], "benchmark": rows, **extra}


def _bar_colors(report: dict) -> dict[str, tuple]:
    """backend -> the face colour of its deploy-form bar (each row's throughput is unique, so its bar's width)."""
    figure = throughput_figure(report)
    bars = [patch for axes in figure.axes for patch in axes.patches if isinstance(patch, Rectangle)]
    return {
        row["backend"]: next(bar.get_facecolor() for bar in bars if bar.get_width() == row["throughput"])
        for row in report["benchmark"]
        if row["form"] == "deploy"
    }


def test_a_backend_keeps_its_colour_whichever_backends_ran_and_in_whatever_order():
    """Colours by name: another set of backends, or another one fastest, leaves each backend's colour as it was."""
    first = _bar_colors(_report([_row("deploy", "eager", 100.0), _row("deploy", "onnxruntime", 900.0)]))
    second = _bar_colors(
        _report(
            [_row("deploy", "openvino", 950.0), _row("deploy", "onnxruntime", 901.0), _row("deploy", "eager", 99.0)]
        )
    )
    third = _bar_colors(_report([_row("deploy", "onnxruntime", 902.0)]))
    assert first["onnxruntime"] == second["onnxruntime"] == third["onnxruntime"]
    assert first["eager"] == second["eager"]
    assert len(set(second.values())) == 3


def test_every_backend_of_the_registry_has_a_colour_of_its_own():
    from repblocks.deploy.plot import BACKEND_COLORS, backend_color

    assert set(BACKENDS) <= set(BACKEND_COLORS)
    assert len({backend_color(name) for name in BACKENDS}) == len(BACKENDS)
    assert backend_color("a_new_engine") == backend_color("a_new_engine")  # not listed yet: still one colour


def test_the_title_gives_the_input_the_exported_model_takes(tmp_path):
    """The exports take one 3x32x32 image per batch entry; the run timed 40x40 images (bench.image_size)."""
    report = _report([_row("deploy", "eager", 100.0)], input_shape=[3, 32, 32], image_shape=[3, 40, 40])
    title = throughput_figure(report).get_suptitle()
    assert "model input 1x3x32x32" in title and "timed at 1x3x40x40" in title
    write_throughput_plot(report, tmp_path / "throughput.png")
    assert Image.open(tmp_path / "throughput.png").text["Title"] == title  # the saved file says it too
    same = _report([_row("deploy", "eager", 100.0)], input_shape=[1, 28, 28], image_shape=[1, 28, 28])
    assert "model input 1x1x28x28," in throughput_figure(same).get_suptitle()


def test_verify_compares_every_validation_image_by_default_as_training_does():
    assert VerifyConfig().real_batches is None


@pytest.mark.slow
def test_the_headline_is_one_line_and_counts_the_validation_images_as_training(tmp_path):
    """The digits have 360 validation images: deploy verifies on them all and says so (it said 256: 4 batches of 64)."""
    from repblocks.deploy.report import headline

    data = DigitsData(image_size=32)
    data.setup("validate")
    total = len(data.val_set)  # what training validates on and counts ("over the 360 validation images")
    ckpt = write_untrained_run(tmp_path / "run.ckpt", "repvgg_tiny")
    config = {"ckpt": str(ckpt), "bench": {"device": "cpu", "batch_sizes": []}, "export": {"formats": []}}
    report = run_deploy(DeployConfig.from_dict({**config, "out_dir": str(tmp_path / "out")}))
    real = report["verify"]["real_images"]
    assert real["images"] == real["validation_images"] == total
    line = headline(report)
    assert "\n" not in line and line.startswith("repvgg_tiny: ")
    assert f"of {total} validation images" in line and f"files in {tmp_path / 'out'}" in line
    # The error quoted beside the validation images is theirs (random images at 224x224 err more: 9e-5 vs 5e-6).
    assert f"(max error {real['max_abs_err']:.1e} there)" in line
    assert line.replace(f"; files in {tmp_path / 'out'}", "") in (tmp_path / "out" / "report.md").read_text()

    capped = run_deploy(
        DeployConfig.from_dict({**config, "out_dir": str(tmp_path / "capped"), "verify": {"real_batches": 1}})
    )
    batch = data.batch_size
    assert f"of {batch} of the {total} validation images (verify.real_batches=1)" in headline(capped)
    assert Path(capped["files"]["json"]).parent == tmp_path / "capped"
