"""benchmarks/family_speed.py: what it times and says, on tiny models and inputs (never how fast anything is)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.family_speed import IPHONE12_MS, ordering_line, registered

ROOT = Path(__file__).resolve().parents[1]


def test_names_not_registered_are_skipped_with_one_line_each():
    names, skipped = registered(["repghostnet_tiny", "fastvit_zz", "repvgg_tiny"])
    assert names == ["repghostnet_tiny", "repvgg_tiny"]
    assert skipped == ["fastvit_zz: not registered here, skipped"]


def _timings(ms: dict) -> dict:
    return {1: {"models": {name: {"deploy openvino fp32": {"ms_median": value}} for name, value in ms.items()}}}


def test_ordering_line_compares_our_batch_1_order_with_the_published_one():
    published = sorted(IPHONE12_MS, key=IPHONE12_MS.get)
    same = ordering_line(_timings({name: float(rank) for rank, name in enumerate(published)}))
    assert same.endswith(": the same order")
    reversed_order = ordering_line(_timings({name: -float(rank) for rank, name in enumerate(published)}))
    assert reversed_order.endswith(": another order")
    assert "nothing to compare" in ordering_line(_timings({"repvgg_a0": 1.0, published[0]: 2.0}))


@pytest.mark.slow  # a separate Python process that quantizes with NNCF (tens of seconds on 2 cores); CI runs it
def test_family_speed_quick_times_train_and_deploy_forms_and_gates_int8(tmp_path):
    out, table = tmp_path / "family.json", tmp_path / "family.md"
    args = ["--quick", "--threads", "1", "--batch-sizes", "1", "--rounds", "1", "--calibration-images", "4"]
    args += ["--models", "repghostnet_tiny", "no_such_model", "--json", str(out), "--markdown", str(table)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.family_speed", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "no_such_model: not registered here, skipped" in result.stdout
    results = json.loads(out.read_text())
    timed = results["timings"]["1"]["models"]["repghostnet_tiny"]
    fp32 = {
        f"{form} {backend} fp32" for form in ("train", "deploy") for backend in ("eager", "openvino", "onnxruntime")
    }
    gate = results["gates"]["repghostnet_tiny"]
    assert set(timed) == fp32 | ({"deploy openvino int8"} if gate["passed"] else set())
    assert timed["train eager fp32"]["vs_train_eager"] == 1.0
    assert all(row["ms_median"] > 0 for row in timed.values())
    assert table.read_text().count("| repghostnet_tiny | 1 |") == 1
    assert "nothing to compare" in results["ordering"]
