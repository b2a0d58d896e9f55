"""repblocks.bench: the interleaved timer and its statistics; the benchmark and example programs run."""

import argparse
import importlib
import json
import os
import runpy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmarks.common import OtherLoad, parse_benchmark_args, speed_ratio, summarize_samples
from repblocks.bench import median, p90, percentile, round_order, synchronizer, throughput, time_interleaved

ROOT = Path(__file__).resolve().parents[1]


def _recorder(calls: list[str], name: str):
    return lambda: calls.append(name)


def test_time_interleaved_returns_one_sample_per_round_for_each_candidate():
    calls = []
    candidates = {name: _recorder(calls, name) for name in "abc"}
    samples = time_interleaved(candidates, rounds=5, warmup=2)
    assert list(samples) == ["a", "b", "c"]
    assert all(len(times) == 5 and all(t >= 0 for t in times) for times in samples.values())
    assert len(calls) == 3 * (2 + 5)


def test_time_interleaved_warms_up_each_candidate_then_changes_the_order_every_round():
    calls = []
    time_interleaved({name: _recorder(calls, name) for name in "abc"}, rounds=6, warmup=1)
    warmup, timed = calls[:3], calls[3:]
    assert warmup == ["a", "b", "c"]
    rounds = ["".join(timed[i : i + 3]) for i in range(0, len(timed), 3)]
    assert rounds == ["abc", "bca", "cab", "cba", "acb", "bac"]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6])
def test_round_order_balances_first_place_and_predecessors(count):
    names = [f"model{i}" for i in range(count)]
    cycle = count if count % 2 == 0 else 2 * count
    orders = [round_order(names, round_idx) for round_idx in range(cycle)]
    assert all(sorted(order) == names for order in orders)
    assert Counter(order[0] for order in orders) == Counter({name: cycle // count for name in names})
    neighbours = Counter((order[i - 1], order[i]) for order in orders for i in range(1, count))
    assert set(neighbours.values()) <= {cycle // count} and len(neighbours) == count * (count - 1)
    assert round_order(names, cycle) == orders[0]


def test_time_interleaved_runs_in_inference_mode_and_calls_sync_around_each_call():
    modes, syncs = [], []
    time_interleaved(
        {"x": lambda: modes.append(torch.is_inference_mode_enabled())}, rounds=3, warmup=1, sync=lambda: syncs.append(1)
    )
    assert modes == [True] * 4
    assert len(syncs) == 1 + 2 * 3  # once after the warm-up, then before and after each timed call


def test_time_interleaved_can_leave_inference_mode_off_for_training_steps():
    weight = torch.ones(2, requires_grad=True)

    def train_step():
        assert not torch.is_inference_mode_enabled()
        (weight * 3).sum().backward()

    time_interleaved({"train": train_step}, rounds=2, warmup=1, inference=False)
    assert weight.grad.tolist() == [9.0, 9.0]  # three calls, each adding 3


class _Clock:
    """A ``time.perf_counter`` that moves only when told: timings without the wall clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_other_load_counts_the_cpu_time_of_other_processes(monkeypatch):
    import repblocks.bench as common  # OtherLoad lives there; benchmarks.common re-exports it

    clock = _Clock()
    machine, own = iter([100.0, 103.0]), iter([10.0, 11.0])  # CPU seconds used: 3 by everyone, 1 by this process
    monkeypatch.setattr(common.time, "perf_counter", clock)
    monkeypatch.setattr(common, "_machine_busy_seconds", lambda: next(machine))
    monkeypatch.setattr(common, "_own_busy_seconds", lambda: next(own))
    with OtherLoad() as load:
        clock.advance(2.0)
    assert load.cores == pytest.approx(1.0)  # 2 CPU seconds of others in 2 s: one core
    assert "1.00" in load.warning() and load.warning(threshold=2.0) is None


def test_other_load_says_nothing_where_it_cannot_measure(monkeypatch):
    import repblocks.bench as common

    monkeypatch.setattr(common, "_machine_busy_seconds", lambda: None)  # no /proc/stat
    with OtherLoad() as load:
        pass
    assert load.cores is None and load.warning() is None


def test_time_interleaved_times_each_call_between_two_clock_reads(monkeypatch):
    import repblocks.bench as bench

    clock = _Clock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    candidates = {"fast": lambda: clock.advance(0.25), "slow": lambda: clock.advance(1.5)}
    samples = time_interleaved(candidates, rounds=3, warmup=1, sync=lambda: None)
    assert samples == {"fast": [0.25] * 3, "slow": [1.5] * 3}  # what each call took, warm-up calls not counted


@pytest.mark.parametrize("kwargs", [dict(rounds=0), dict(warmup=-1)])
def test_time_interleaved_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError, match="rounds"):
        time_interleaved({"a": lambda: None}, **kwargs)


def test_time_interleaved_rejects_no_candidates():
    with pytest.raises(ValueError, match="at least one candidate"):
        time_interleaved({})


def test_synchronizer_waits_for_the_first_accelerator_named_and_not_for_the_cpu(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(str(device)))
    synchronizer(torch.zeros(2), [torch.ones(1)], {"out": torch.ones(1)}, "cpu", None)()
    assert waited == []  # CPU work is done when the call returns: nothing to wait for
    synchronizer(torch.zeros(1), {"logits": [torch.device("cuda:1")]}, "cuda:0")()
    assert waited == ["cuda:1"]  # found inside nested outputs, before the later "cuda:0"


@pytest.mark.gpu
def test_time_interleaved_waits_for_cuda_outputs(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    time_interleaved({"cuda": lambda: torch.ones(1, device="cuda")}, rounds=1, warmup=1)
    assert len(waited) == 3


def test_median_and_p90_on_known_data():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert p90([float(v) for v in range(10, 0, -1)]) == pytest.approx(9.1)  # NumPy's linear interpolation
    assert p90([5.0]) == 5.0
    assert percentile([1.0, 2.0, 3.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0], 100) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == median([1.0, 2.0, 3.0, 4.0])


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_throughput():
    assert throughput(16, 0.5) == 32.0
    with pytest.raises(ValueError, match="positive"):
        throughput(16, 0.0)


def _run(*args: str) -> subprocess.CompletedProcess:
    # One intra-op thread: on a small machine shared with other jobs, OpenMP threads that outnumber
    # the free cores make these smoke runs many times slower without testing anything more.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a separate Python process of several seconds; CI runs it
def test_compare_timm_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    result = _run("-m", "benchmarks.compare_timm", "--quick", "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["config"]["image_size"] == 64 and results["config"]["batch_size"] == 2
    assert {"ours deploy", "timm deploy", "resnet18 folded"} <= set(results["models"])
    assert all(len(stats["samples_s"]) == 2 for stats in results["models"].values())
    assert all(error["rel"] <= 1e-4 for error in results["errors"].values())
    assert "ours deploy / timm deploy" in results["ratios"]


@pytest.mark.slow  # a separate Python process of several seconds; CI runs it
def test_zoo_speed_quick_times_every_family_beside_resnet18(tmp_path):
    out, table = tmp_path / "zoo.json", tmp_path / "zoo.md"
    result = _run(
        "-m", "benchmarks.zoo_speed", "--quick", "--threads", "1", "--json", str(out), "--markdown", str(table)
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    timing = results["timings"]["2"]
    assert set(timing["models"]) == {"repvgg_tiny", "qarepvgg_tiny", "mobileone_tiny", "resnet18"}
    assert timing["ratios"]["resnet18"]["ratio"] == 1.0
    assert all(cost["rel_err"] <= 1e-4 and cost["deploy_params"] > 0 for cost in results["costs"].values())
    assert table.read_text().count("\n") == 2 + len(timing["models"])


@pytest.mark.slow  # a separate Python process importing torch and torchvision; CI runs it
def test_zoo_speed_names_what_exists_for_a_pattern_that_matches_nothing():
    result = _run("-m", "benchmarks.zoo_speed", "--models", "resnet9*")
    assert result.returncode == 2 and "no registered model matches 'resnet9*'; registered: " in result.stderr


@pytest.mark.slow  # a separate Python process of several seconds; CI runs it
def test_custom_backbone_example_runs():
    result = _run("examples/custom_backbone.py")
    assert result.returncode == 0, result.stderr
    assert "max error" in result.stdout


@pytest.mark.slow  # a separate Python process of several seconds; CI runs it
def test_convert_repvgg_example_runs():
    result = _run("examples/convert_repvgg.py")
    assert result.returncode == 0, result.stderr
    assert "top-1 agreement 100%" in result.stdout


def test_train_throughput_runs_in_process_and_writes_json(tmp_path):
    main = runpy.run_module("benchmarks.train_throughput")["main"]
    out = tmp_path / "results.json"
    threads = torch.get_num_threads()
    try:
        args = ["--quick", "--image-size", "32", "--rounds", "1", "--warmup", "0", "--threads", "1"]
        assert main([*args, "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    assert results["config"]["batch_size"] == 2 and results["config"]["image_size"] == 32
    assert set(results["models"]) == {"ours", "timm"}
    assert all(len(stats["samples_s"]) == 1 for stats in results["models"].values())
    assert results["ratio_ours_over_timm"]["ratio"] > 0
    losses = results["first_step_losses"]
    assert losses["ours"] == pytest.approx(losses["timm"], rel=1e-4)


def test_speed_ratio_is_deploys_paired_ratio_with_the_per_round_spread():
    ratio = speed_ratio(candidate=[1.0, 2.0, 1.0], baseline=[2.0, 4.0, 8.0])
    assert ratio["ratio"] == 2.0  # the median of the per-round ratios 2, 2 and 8, as deploy's report quotes it
    assert ratio["of_medians"] == 4.0 / 1.0
    assert (ratio["per_round_min"], ratio["per_round_max"]) == (2.0, 8.0)
    stats = summarize_samples({"a": [0.5, 0.25, 1.0]}, batch_size=8)["a"]
    assert stats["images_per_s"] == 16.0 and stats["ms_median"] == 500.0


def test_benchmark_args_defaults_quick_and_checks():
    def parse(*argv):
        return parse_benchmark_args(
            argparse.ArgumentParser(),
            list(argv),
            defaults=dict(batch_size=16, image_size=224, rounds=60, warmup=2),
            quick=dict(batch_size=2, image_size=32, rounds=2, warmup=1),
        )

    assert (parse().batch_size, parse("--quick").batch_size, parse("--quick", "--batch-size", "4").batch_size) == (
        16,
        2,
        4,
    )
    with pytest.raises(SystemExit):
        parse("--rounds", "0")


def _run_main(module: str, *args: str) -> int:
    """A benchmark program's ``main`` run in this process (no second interpreter start), threads restored."""
    main = importlib.import_module(module).main  # not runpy: a dataclass needs its module in sys.modules
    threads = torch.get_num_threads()
    try:
        return main(list(args))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # four A0 training steps and a profiler start: about ten seconds; CI runs it
def test_train_cost_quick_reports_speed_memory_and_ratios(tmp_path):
    out, table = tmp_path / "cost.json", tmp_path / "cost.md"
    args = ["--quick", "--rounds", "1", "--warmup", "0", "--threads", "1", "--json", str(out), "--markdown", str(table)]
    assert _run_main("benchmarks.train_cost", *args) == 0
    results = json.loads(out.read_text())
    assert list(results["models"]) == ["plain", "offline", "online", "timm"]
    for stats in results["models"].values():
        assert stats["steps_per_s"] > 0 and stats["peak_bytes"] > 0 and stats["resting_bytes"] > 0
    assert set(results["ratios"]) == {"online / offline", "offline / timm", "plain / offline"}
    assert [t["ratio"] for t in results["targets"]] == ["online / offline", "online / offline", "offline / timm"]
    assert "| online / offline |" in table.read_text()


def test_cpu_peak_is_the_steps_own_whatever_an_earlier_profile_left_behind():
    """The profiler's running total carries over between profiles: a leftover of one must not count in the next."""
    from benchmarks.train_cost import _cpu_peak_bytes

    kept = []
    _cpu_peak_bytes(lambda: kept.append(torch.empty(2**20, dtype=torch.uint8)))  # allocated here, freed below
    kept.clear()
    peak = _cpu_peak_bytes(lambda: torch.empty(2**20, dtype=torch.uint8))
    assert 2**20 <= peak < 2**20 + 2**16


@pytest.mark.slow  # seven blocks' training steps and a profiler start each: seconds; CI runs it
def test_block_cost_quick_reports_every_block_and_the_issue_targets(tmp_path):
    out = tmp_path / "blocks.json"
    args = ["--quick", "--rounds", "1", "--warmup", "0", "--threads", "1", "--json", str(out)]
    assert _run_main("benchmarks.block_cost", *args) == 0
    results = json.loads(out.read_text())
    assert {"repvgg online", "dbb offline", "dbb online", "orepa online"} <= set(results["models"])
    assert all(stats["steps_per_s"] > 0 and stats["peak_bytes"] > 0 for stats in results["models"].values())
    assert [t["ratio"] for t in results["targets"]] == [
        "dbb online / dbb offline",
        "dbb online / dbb offline",
        "repvgg online / repvgg offline",
    ]


@pytest.mark.slow  # Lightning's start and two short fits: several seconds of CPU; CI runs it
def test_branch_accuracy_quick_trains_each_variant_or_says_it_is_unavailable(tmp_path):
    out = tmp_path / "acc.json"
    args = ["--quick", "--epochs", "1", "--variants", "plain", "dbb", "online", "--threads", "1", "--json", str(out)]
    assert _run_main("benchmarks.branch_accuracy", *args) == 0
    rows = {row["variant"]: row for row in json.loads(out.read_text())["variants"]}
    assert list(rows) == ["plain", "dbb", "online"]
    assert rows["plain"]["available"] and rows["online"]["available"]
    for row in rows.values():  # dbb: trained once its branch set lands, reported as unavailable until then
        assert (len(row["per_seed"]) == 1 and 0 <= row["mean"] <= 100) if row["available"] else row["reason"]


def test_branch_accuracy_refuses_an_unknown_variant_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run_main("benchmarks.branch_accuracy", "--variants", "repvgg", "dbbx")
    assert exit_info.value.code == 2
    assert "unknown variant dbbx; known variants: plain, repvgg, acnet, dbb, online" in capsys.readouterr().err


def test_paired_ratio_is_the_median_of_the_rounds_with_their_spread():
    from repblocks.bench import paired_ratio

    # The machine slowed down in rounds 3 and 4, for both runners alike: each round's ratio is still 4.
    ratio = paired_ratio(candidate=[1.0, 1.0, 1.1, 1.2, 1.0], reference=[4.0, 4.0, 4.4, 4.8, 4.0])
    assert ratio.value == pytest.approx(4.0) and (ratio.low, ratio.high) == pytest.approx((4.0, 4.0))
    assert ratio.rounds == 5 and ratio.steady and ratio.unsteady_reason() is None
    with pytest.raises(ValueError, match="same rounds"):
        paired_ratio([1.0], [1.0, 2.0])


def test_a_ratio_to_a_reference_that_collapsed_is_unsteady_and_says_which_runner():
    from repblocks.bench import SPREAD_LIMIT, paired_ratio, spread

    # The reference ran in 10 ms once and in 90 ms the other four rounds: its median alone looks steady.
    collapsed = [0.010, 0.090, 0.091, 0.090, 0.092]
    assert spread(collapsed) > SPREAD_LIMIT and p90(collapsed) / median(collapsed) < 1.1
    ratio = paired_ratio(candidate=[0.005] * 5, reference=collapsed)
    assert ratio.value == pytest.approx(18.0) and ratio.low == pytest.approx(2.0 + 0.4 * 16.0)
    assert not ratio.steady
    assert ratio.unsteady_reason("deploy", "train eager") == (
        "train eager's p90 was 9.2x its fastest call (over 1.5x: unsteady timings)"
    )


def test_time_interleaved_says_how_long_it_will_take_before_it_starts(monkeypatch, caplog):
    import logging

    import repblocks.bench as bench

    clock = _Clock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    candidates = {"fast": lambda: clock.advance(0.5), "slow": lambda: clock.advance(2.0)}
    with caplog.at_level(logging.INFO, logger="repblocks.bench"):
        time_interleaved(candidates, rounds=4, warmup=1, sync=lambda: None)
    first = caplog.records[0].getMessage()
    assert first == "timing 2 candidates x 4 rounds: about 10.0 s (from their last warm-up calls)"
