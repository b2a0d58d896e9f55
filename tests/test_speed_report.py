"""Deploy's speed headline: ratios paired round by round, and none quoted to a reference that collapsed.

The timings are fake (time_interleaved is replaced), so these tests assert what the report says
about given times, never how fast anything ran.
"""

import pytest

from repblocks.deploy.config import DeployConfig
from repblocks.deploy.pipeline import run_deploy

TIMED = dict(device="cpu", batch_sizes=[1, 2], backends=["eager"], rounds=5, warmup=0, threads=1)
STEADY_TRAIN = [0.010, 0.011, 0.010, 0.012, 0.010]
COLLAPSED_TRAIN = [0.010, 0.090, 0.091, 0.090, 0.092]  # as a busy neighbour makes eager torch: p90 9x the best
DEPLOY = [0.005, 0.0055, 0.005, 0.006, 0.005]


@pytest.fixture
def fake_times(monkeypatch):
    """time_interleaved returns these seconds per round, one ``{"train": [...], "deploy": [...]}`` per batch size."""
    times = []

    def time_interleaved(candidates, **_):
        per_form = times.pop(0)  # batch sizes are timed in order, one call each
        return {key: per_form[key.split()[0]] for key in candidates}  # keys: "train eager fp32", ...

    monkeypatch.setattr("repblocks.deploy.speed.time_interleaved", time_interleaved)
    return times


def _deploy(tmp_path):
    config = {"out_dir": str(tmp_path / "out"), "model": "repvgg_tiny", "bench": TIMED, "export": {"formats": []}}
    return run_deploy(DeployConfig.from_dict(config))


def test_the_headline_is_a_paired_ratio_with_its_rounds_and_withheld_when_the_reference_collapsed(tmp_path, fake_times):
    fake_times += [{"train": STEADY_TRAIN, "deploy": DEPLOY}, {"train": COLLAPSED_TRAIN, "deploy": DEPLOY}]
    report = _deploy(tmp_path)
    steady, collapsed = report["fastest_deploy"]
    assert steady["ratio_to_train_eager"] == pytest.approx(2.0) and steady["withheld"] is None
    assert steady["ratio_range"] == pytest.approx([2.0, 2.0])
    assert collapsed["ratio_to_train_eager"] is None
    assert collapsed["withheld"].startswith("the train form eager fp32's p90 was 9.2x its fastest call")
    rows = {row["batch_size"]: row for row in report["benchmark"] if row["form"] == "deploy"}
    assert rows[2]["ratio_to_train_eager"] == pytest.approx(0.090 / 0.0055)  # the median round; in the table, marked
    assert rows[2]["ratio_to_train_eager_unsteady"] and rows[1]["ratio_to_train_eager_unsteady"] is None
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "batch 1: eager fp32, 2.00x the train form eager fp32 (rounds 2.00x-2.00x)" in markdown
    assert "batch 2: eager fp32, its ratio to the train form eager fp32 withheld: the train form" in markdown
    assert "| 16.36x* |" in markdown and "* a runner of this ratio had its p90 over 1.5x its fastest call" in markdown
    assert "16.36x the train form" not in markdown


def test_a_steady_report_has_no_unsteady_mark(tmp_path, fake_times):
    fake_times += [{"train": STEADY_TRAIN, "deploy": DEPLOY}] * 2
    report = _deploy(tmp_path)
    assert [best["withheld"] for best in report["fastest_deploy"]] == [None, None]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "*" not in markdown.split("## Benchmark")[1].split("Timer:")[0]
