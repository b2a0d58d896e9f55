"""Deploy's settings are all checked before any work, and its outputs are written all or nothing."""

import json
import re
from pathlib import Path

import pytest
import torch

from repblocks.deploy.config import DeployConfig
from repblocks.deploy.engines import engine
from repblocks.deploy.pipeline import run_deploy
from repblocks.errors import OutputMismatch, UserError

NO_BENCH = dict(device="cpu", batch_sizes=[])


def _config(out_dir: Path, **settings) -> DeployConfig:
    return DeployConfig.from_dict({"out_dir": str(out_dir), "bench": NO_BENCH, **settings})


def _listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture
def never_load(monkeypatch):
    """Loading fails the test: the check under test must come before anything is loaded."""

    def load_network(**_):
        raise AssertionError("the network was loaded before the settings were checked")

    monkeypatch.setattr("repblocks.deploy.pipeline.load_network", load_network)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(bench=dict(image_size="abc")), r"^bench.image_size must be an integer or null, got 'abc'$"),
        (dict(bench=dict(image_size=-5)), r"^bench.image_size must be at least 1, got -5$"),
        (
            dict(bench=dict(image_size=20000)),
            r"at most 4096, got 20000: one 3x20000x20000 float32 image alone is 4.5 GiB",
        ),
        (dict(bench=dict(image_size=True)), r"bench.image_size must be an integer or null, got True"),
        (dict(bench=dict(threads=-1)), r"^bench.threads must be at least 1, got -1$"),
        (dict(bench=dict(warmup=-3)), r"^bench.warmup must be at least 0, got -3$"),
        (dict(bench=dict(rounds=0)), r"^bench.rounds must be at least 1, got 0$"),
        (dict(bench=dict(batch_sizes=[1, 0])), r"^bench.batch_sizes must be at least 1, got 0$"),
        (dict(bench=dict(batch_sizes=16)), r"^bench.batch_sizes must be a list of integers or null, got 16$"),
        (dict(bench=dict(tf32="yes")), r"^bench.tf32 must be true or false, got 'yes'$"),
        (dict(bench=3), r"^bench must be a group of settings"),
        (dict(verify=dict(atol=-1e-3)), r"^verify.atol must be at least 0, got -0.001$"),
        (dict(verify=dict(real_batches=-1)), r"^verify.real_batches must be at least 0"),
        (dict(export=dict(onnx_opset=7)), r"^export.onnx_opset must be at least 18, got 7$"),
        (dict(export=dict(onnx_opset=99)), r"^export.onnx_opset must be at most \d+, got 99$"),
        (dict(export=dict(formats="onnx")), r"^export.formats must be a list of names or null, got 'onnx'$"),
        (dict(num_classes=0), r"^num_classes must be at least 1, got 0$"),
        (dict(models="repvgg_a0"), r"^models must be a list of names or null, got 'repvgg_a0'$"),
    ],
)
def test_a_bad_setting_is_one_line_before_anything_is_built(tmp_path, settings, message):
    with pytest.raises(UserError, match=message):
        _config(tmp_path / "out", model="repvgg_tiny", **settings)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(models=["repvgg_tiny", "repvgg_z9"]), r"unknown model 'repvgg_z9'; registered models: .*\brepvgg_a0"),
        (dict(models=["torchvision:nope"]), r"unknown torchvision classification model 'nope'"),
        (dict(models=["repvgg_tiny"], model="repvgg_tiny"), r"models=\[...\] times the models it names"),
    ],
)
def test_speed_table_names_are_checked_before_any_model_is_built(tmp_path, never_load, settings, message):
    with pytest.raises(UserError, match=message):
        run_deploy(_config(tmp_path / "out", bench=dict(NO_BENCH, batch_sizes=[1]), **settings))
    assert list(tmp_path.iterdir()) == []


def test_out_dir_that_is_a_file_is_refused_before_loading(tmp_path, never_load):
    (tmp_path / "out").write_text("the user's file")
    with pytest.raises(UserError, match=r"out_dir .*out is a file; give a folder"):
        run_deploy(_config(tmp_path / "out", model="repvgg_tiny"))
    assert (tmp_path / "out").read_text() == "the user's file"


def test_a_folder_that_is_not_a_deploy_output_is_never_replaced(tmp_path, never_load):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's notes")
    with pytest.raises(UserError, match=r"not empty and not a deploy output \(it holds notes.txt\)"):
        run_deploy(_config(tmp_path / "out", model="repvgg_tiny"))
    assert _listing(tmp_path) == ["out", "out/notes.txt"]


def test_a_previous_deploy_output_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    run_deploy(_config(out, model="repvgg_tiny", export={"formats": ["safetensors"]}))
    assert (out / "model.safetensors").is_file()
    report = run_deploy(_config(out, model="repvgg_tiny_g2se", export={"formats": []}))
    # The first model's export is gone: nothing in out_dir belongs to another run.
    assert report["model"] == "repvgg_tiny_g2se" and report["exports"] == {}
    assert _listing(tmp_path) == ["out", "out/config.json", "out/report.json", "out/report.md"]
    assert '"model": "repvgg_tiny_g2se"' in (out / "config.json").read_text()


def test_an_output_of_an_older_deploy_with_hydras_files_is_replaced_too(tmp_path):
    out = tmp_path / "out"
    (out / ".hydra").mkdir(parents=True)
    for name in (".hydra/config.yaml", "deploy.log", "report.json", "model.onnx", ".model.onnx.x1y2.tmp"):
        (out / name).write_text("from an older run")
    run_deploy(_config(out, model="repvgg_tiny", export={"formats": []}))
    assert _listing(tmp_path) == ["out", "out/config.json", "out/report.json", "out/report.md"]


def test_missing_parents_of_out_dir_are_made_and_removed_again_on_failure(tmp_path, monkeypatch):
    def failing_export(*_, **__):
        raise UserError("the export failed")

    monkeypatch.setattr("repblocks.deploy.pipeline.export_all", failing_export)
    with pytest.raises(UserError, match="the export failed"):
        run_deploy(_config(tmp_path / "a" / "b" / "out", model="repvgg_tiny"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("raised", [RuntimeError("a bug while timing"), KeyboardInterrupt()])
def test_a_failure_after_the_exports_leaves_the_previous_output_as_it_was(tmp_path, monkeypatch, raised):
    out = tmp_path / "out"
    run_deploy(_config(out, model="repvgg_tiny", export={"formats": []}))
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def failing_timer(*_, **__):
        raise raised

    monkeypatch.setattr("repblocks.deploy.pipeline.time_forms", failing_timer)
    with pytest.raises(type(raised)):
        run_deploy(_config(out, model="repvgg_tiny_g2se", export={"formats": ["safetensors"]}))
    # Neither the new export nor a staging folder: out_dir is the previous run's, byte for byte.
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_device_is_checked_before_loading(tmp_path, never_load):
    with pytest.raises(UserError, match="no CUDA device is available"):
        run_deploy(_config(tmp_path / "out", model="repvgg_tiny", bench=dict(NO_BENCH, device="cuda")))
    assert list(tmp_path.iterdir()) == []


def test_a_batch_larger_than_the_memory_is_refused_before_it_is_made(tmp_path, monkeypatch):
    monkeypatch.setattr("repblocks.deploy.runtime.total_memory", lambda device: 2**30)
    bench = dict(NO_BENCH, batch_sizes=[1, 512], image_size=512)  # 512 x 3 x 512 x 512 x 4 bytes: 1.5 GiB
    with pytest.raises(
        UserError, match=r"a batch of 512 images of 3x512x512 is 1.5 GiB .* than the 1.0 GiB of cpu memory"
    ):
        run_deploy(_config(tmp_path / "out", model="repvgg_tiny", bench=bench))
    assert list(tmp_path.iterdir()) == []


# Every file name an export can write (export.FILE_NAMES, INT8_FILE_NAMES, OpenVINO's .bin): a previous output
# holding one is a deploy output. Written by hand so that a name added to the exports must be added here too.
EXPORT_FILES = ["model.safetensors", "model.onnx", "model.pt2", "model.xml", "model.bin"]
EXPORT_FILES += ["model_int8.xml", "model_int8.bin", "model_int8.onnx"]
EXPORT_FILES += ["model_bf16.xml", "model_bf16.bin", "model_fp16.xml", "model_fp16.bin"]  # OpenVINO's gated floats
EXPORT_FILES += [
    "model.pte",
    "model_int8.pte",
    "model.tflite",
    "model_int8.tflite",
    "model.mlpackage",
    "model_fp16.mlpackage",
    "model.aoti.pt2",
]  # .mlpackage: folders


def test_every_file_an_export_writes_is_a_deploy_file():
    from repblocks.deploy.engines import ENGINES
    from repblocks.deploy.outputs import DEPLOY_FILES

    written = {file for entry in ENGINES for file in entry.files.values()}
    written |= {Path(name).with_suffix(".bin").name for name in written if name.endswith(".xml")}
    assert written == set(EXPORT_FILES) and written <= DEPLOY_FILES


@pytest.mark.parametrize("name", EXPORT_FILES)
def test_an_output_holding_any_export_is_replaced(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    for previous in ("report.json", "report.md", name):
        (out / previous).write_text("from a previous run")
    run_deploy(_config(out, model="repvgg_tiny", export={"formats": []}))
    assert _listing(tmp_path) == ["out", "out/config.json", "out/report.json", "out/report.md"]


@pytest.mark.parametrize("fmt", ["safetensors", "onnx", "torch_export", "openvino"])
def test_deploying_twice_into_one_out_dir_works_for_every_format(tmp_path, fmt):
    out = tmp_path / "out"
    for _ in range(2):
        report = run_deploy(_config(out, model="repvgg_tiny", export={"formats": [fmt]}))
    assert Path(report["exports"][fmt]["path"]).parent == out
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # nothing moved aside or staged is left


@pytest.mark.parametrize("target", ["empty", "earlier output"])
def test_out_dir_that_is_a_link_to_a_folder_is_written_through(tmp_path, target):
    real = tmp_path / "real"
    real.mkdir()
    if target == "earlier output":
        run_deploy(_config(real, model="repvgg_tiny_g2se", export={"formats": []}))
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    report = run_deploy(_config(link, model="repvgg_tiny", export={"formats": ["safetensors"]}))
    assert link.is_symlink() and link.resolve() == real  # the link stays; the folder it names holds the outputs
    assert report["model"] == "repvgg_tiny" and (real / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "real"]  # no .replaced or staging folder


def _staging_of(out: Path, tag: str, owner: str | None) -> Path:
    staging = out.parent / f".{out.name}.{tag}.deploy-staging"
    staging.mkdir()
    (staging / "model.onnx").write_text("half an export")
    if owner is not None:
        (staging / ".staging-owner").write_text(owner)
    return staging


def test_staging_folders_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from repblocks.files import _start_time

    out = tmp_path / "out"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = _staging_of(out, "dead", f"{int(finished.stdout)} 123\n")  # its process has exited
    reused = _staging_of(out, "reused", f"{os.getpid()} 1\n")  # the pid runs, but started at another time
    live = _staging_of(out, "live", f"{os.getpid()} {_start_time(os.getpid())}\n")
    unknown = _staging_of(out, "unknown", None)  # no owner file: nothing proves its writer dead
    run_deploy(_config(out, model="repvgg_tiny", export={"formats": []}))
    assert not dead.exists() and not reused.exists()
    assert live.is_dir() and unknown.is_dir()


def test_a_disk_too_small_for_the_exports_is_one_line_before_anything_is_written(tmp_path):
    from tests.helpers import small_disk

    with small_disk(tmp_path / "disk") as disk:
        formats = ["safetensors", "onnx", "torch_export"]  # about 3 x 0.7 MB of repvgg_tiny's weights, on 2 MB
        with pytest.raises(
            UserError, match=rf"^out_dir {disk}/out: not enough space, [\d.]+ MB needed and [\d.]+ MB free"
        ):
            run_deploy(_config(disk / "out", model="repvgg_tiny", export={"formats": formats}))
        assert list(disk.iterdir()) == []


def test_a_disk_that_fills_up_while_writing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from tests.helpers import small_disk

    monkeypatch.setattr("repblocks.deploy.pipeline.check_out_dir_space", lambda *_: None)  # as if the estimate missed
    with small_disk(tmp_path / "disk") as disk:
        formats = ["safetensors", "onnx", "torch_export"]
        with pytest.raises(
            UserError,
            match=rf"^no space left in {disk} while writing out: it needs about [\d.]+ MB, [\d.]+ MB are free",
        ):
            run_deploy(_config(disk / "out", model="repvgg_tiny", export={"formats": formats}))
        assert list(disk.iterdir()) == []


@pytest.mark.slow  # a train.py/deploy.py process, or DataLoader workers: 15-20 s on 2 busy cores
def test_deploy_py_writes_out_dir_from_a_read_only_working_directory():
    import os
    import subprocess
    import sys
    import tempfile

    from tests.helpers import open_to_everyone, read_only_dir, unprivileged

    root = Path(__file__).resolve().parents[1]
    # Not under pytest's temporary folder, which is owner-only: the unprivileged run must reach it.
    with tempfile.TemporaryDirectory(prefix="repblocks-read-only-cwd-") as tmp:
        folder = open_to_everyone(Path(tmp))
        (folder / "home").mkdir(mode=0o777)
        (folder / "home").chmod(0o777)
        cwd = read_only_dir(folder / "read-only")
        command = [sys.executable, str(root / "deploy.py"), "model=repvgg_tiny", f"out_dir={folder / 'out'}"]
        command += ["bench.device=cpu", "bench.batch_sizes=[]", "export.formats=[safetensors]"]
        env = dict(os.environ, HOME=str(folder / "home"), PYTHONPATH=str(root))
        env.pop("OMP_WAIT_POLICY", None)
        done = subprocess.run(unprivileged(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (folder / "out" / "model.safetensors").is_file() and list(cwd.iterdir()) == []
        # OpenMP's idle threads sleep rather than spin on cores other processes use (deploy.py's default).
        assert json.loads((folder / "out" / "report.json").read_text())["load"]["wait_policy"] == "PASSIVE"


@pytest.fixture
def other_processes_busy(monkeypatch):
    """Other processes keep 1.3 cores busy, as /proc/stat would say: their CPU seconds grow 1.3x as fast as the clock.

    1.3, not 1.5: 4 - 1.5 sits on a rounding edge, and the measured load moves a little with this process's own work.
    """
    import time

    from repblocks import bench

    monkeypatch.setattr(bench, "_machine_busy_seconds", lambda: bench._own_busy_seconds() + 1.3 * time.perf_counter())
    monkeypatch.setattr(bench, "available_cores", lambda: 4)
    monkeypatch.setattr("repblocks.threads.available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # set, it would choose the threads instead


TIMED = dict(device="cpu", batch_sizes=[1], backends=["eager"], rounds=2, warmup=0)


def test_the_report_measures_other_load_while_timing_and_flags_skewed_figures(tmp_path, other_processes_busy):
    report = run_deploy(_config(tmp_path / "out", model="repvgg_tiny", bench=TIMED, export={"formats": []}))
    load = report["load"]
    assert load["other_load_cores"] == pytest.approx(1.3, abs=0.2) and load["skewed"] is True
    assert load["threads"] == 3 and load["threads_chosen"].startswith("3 threads: 4 cores, 1.")  # 4 - 1.3, rounded
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert re.search(r"other processes kept 1\.\d", markdown) and "skewed" in markdown


def test_threads_set_by_hand_are_kept_and_an_idle_machine_is_not_flagged(tmp_path, monkeypatch):
    from repblocks import bench

    monkeypatch.setattr(bench, "_machine_busy_seconds", bench._own_busy_seconds)  # nothing else runs
    settings = dict(TIMED, threads=1)
    report = run_deploy(_config(tmp_path / "out", model="repvgg_tiny", bench=settings, export={"formats": []}))
    assert report["load"]["threads"] == 1 and report["load"]["threads_chosen"] == "1 thread (bench.threads)"
    assert report["load"]["other_load_cores"] == 0 and report["load"]["skewed"] is False
    assert "skewed" not in (tmp_path / "out" / "report.md").read_text()


def test_each_stage_returns_a_typed_result_that_the_report_reads_by_name(tmp_path, monkeypatch):
    from repblocks.deploy import pipeline
    from repblocks.deploy.engines.base import Export
    from repblocks.deploy.speed import Timing
    from repblocks.deploy.verify import Verification

    results = {}

    def recorded(name):
        stage = getattr(pipeline, name)

        def record(*args, **kwargs):
            results[name] = stage(*args, **kwargs)
            return results[name]

        monkeypatch.setattr(pipeline, name, record)

    for name in ("verify", "export_all", "time_forms"):
        recorded(name)
    report = run_deploy(_config(tmp_path / "out", model="repvgg_tiny", bench=TIMED, export={"formats": ["onnx"]}))
    verification, (exports, not_converted), timing = results["verify"], results["export_all"], results["time_forms"]
    assert not_converted == {} == report["not_converted"]
    assert isinstance(verification, Verification) and isinstance(timing, Timing)
    assert isinstance(exports["onnx"], Export) and exports["onnx"].checked_batch_sizes == [1, 3]
    assert report["max_abs_err"] == verification.max_abs_err and report["benchmark"] == timing.rows
    assert report["exports"]["onnx"]["path"] == exports["onnx"].path == str(tmp_path / "out" / "model.onnx")


def test_out_dir_that_is_a_small_disk_of_its_own_says_how_much_space_is_needed(tmp_path):
    from tests.helpers import small_disk

    with small_disk(tmp_path / "disk", size="3m") as disk:  # out_dir is the mount point itself
        formats = ["safetensors", "onnx", "torch_export"]
        with pytest.raises(UserError, match=rf"^out_dir {disk}: not enough space, [\d.]+ MB needed and [\d.]+ MB free"):
            run_deploy(_config(disk, model="repvgg_tiny", export={"formats": formats}))
        assert list(disk.iterdir()) == []
        for _ in range(2):  # room enough: written (and replaced) inside the mount point, which cannot be renamed
            run_deploy(_config(disk, model="repvgg_tiny", export={"formats": ["safetensors"]}))
        assert sorted(path.name for path in disk.iterdir()) == [
            "config.json",
            "model.safetensors",
            "report.json",
            "report.md",
        ]


def _onnx_converter_fails(monkeypatch, error: Exception) -> None:
    """onnxruntime's engine writes half a file, then its converter raises ``error`` (as Core ML's does on an op it lacks)."""
    onnx_engine = engine("onnxruntime")

    def export(model, path, *args, **kwargs):
        Path(path).write_bytes(b"half a model")
        (Path(path).parent / "converter_scratch").mkdir()
        raise error

    monkeypatch.setattr(onnx_engine, "export", export)


def test_a_format_whose_converter_cannot_take_the_network_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    _onnx_converter_fails(monkeypatch, NotImplementedError("Unsupported fx node alias,\nkind alias"))
    out = tmp_path / "out"
    report = run_deploy(_config(out, model="repvgg_tiny", export={"formats": ["safetensors", "onnx", "torch_export"]}))
    assert report["not_converted"] == {"onnx": "NotImplementedError: Unsupported fx node alias,"}
    assert list(report["exports"]) == ["safetensors", "torch_export"]  # the formats after it too
    # Nothing the converter left behind is shipped; the report says which format and why, the headline too.
    assert _listing(out) == ["config.json", "model.pt2", "model.safetensors", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text())["not_converted"] == report["not_converted"]
    markdown = (out / "report.md").read_text()
    assert "## Not converted" in markdown and "- onnx: NotImplementedError: Unsupported fx node alias," in markdown
    assert "; not timed; not converted: onnx (why: report.md)" in markdown.splitlines()[2]  # the headline


def test_an_export_that_does_not_reproduce_the_model_still_stops_the_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_deploy(_config(out, model="repvgg_tiny", export={"formats": []}))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    _onnx_converter_fails(monkeypatch, OutputMismatch("onnxruntime does not reproduce the model: max error 1e-01"))
    with pytest.raises(OutputMismatch, match="does not reproduce the model"):
        run_deploy(_config(out, model="repvgg_tiny", export={"formats": ["safetensors", "onnx"]}))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
