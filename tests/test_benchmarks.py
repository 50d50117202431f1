"""benchmarks/gpu_check.py on CPU at toy sizes (`--device cpu --quick`): every section runs end to
end (what a lent GPU runs at full size) and its JSON carries the figures the closing notes quote."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("gpu_check-*.json")
    result = json.loads(path.read_text())
    assert result["failures"] == [] and result["device_type"] == "cpu" and result["commit"]
    assert {"torch", "transformers"} <= set(result["versions"])
    assert result["matmul"]["flops_per_s"] > 0
    variants = result["models"]["variants"]
    assert set(variants) == {"ntp_eager", "ntp_compiled", "ntp_vocab50257_eager", "cocomix_eager", "cocomix_compiled"}
    assert variants["ntp_eager"]["vocab"] == 50304 and variants["ntp_vocab50257_eager"]["vocab"] == 50257
    assert all(v["tokens_per_s"] > 0 and v["loss"] > 0 for v in variants.values())
    assert result["models"]["ratios"]["cocomix_over_ntp_step_time_compiled"] > 0
    stages = result["stages"]
    assert stages["resumed"] and set(stages["seconds"]) == {
        "prepare_data", "train_teacher_killed_and_resumed", "train_sae", "extract_concepts", "train_cocomix", "eval"}
    # fp32 both ways on CPU: the cache holds exactly what online labelling computes.
    assert result["labels"]["cached_vs_online_fp32"] == {"exact": 1.0, "top1": 1.0, "overlap": 1.0}
    assert 0.0 <= result["labels"]["cached_vs_online_bf16"]["exact"] <= 1.0
    # The all-reduce over 2 gloo processes (NCCL over the GPUs on a GPU), every sum exact.
    coll = result["collectives"]
    assert coll["world"] == 2 and coll["backend"] == "gloo" and [r["mib"] for r in coll["sizes"]] == [1, 16]
    assert all(r["exact"] and r["bus_gb_s"] > 0 for r in coll["sizes"])
    # One step of NTP and CoCoMix at 386M and 1.38B (toy widths here): the pre-flight lower bound beside.
    mem = result["memory"]
    assert set(mem) == {"ntp_386M", "cocomix_386M", "ntp_1.38B", "cocomix_1.38B"}
    assert all(r["lower_bound_gb"] > 0 and r["peak_memory_gb"] is None and r["loss"] > 0 for r in mem.values())


@pytest.mark.slow
def test_label_precision_measures_bf16_against_fp32_labels(tmp_path, concept_cache):
    _, overrides = concept_cache
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/label_precision.py"), "--blocks", "64",
                           "--out", str(tmp_path), *overrides], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("label_precision-*.json")
    result = json.loads(path.read_text())
    assert result["blocks"] == 64 and result["positions"] == 64 * 63  # the last position of a block has none
    rows = result["precisions"]
    assert set(rows) == {"fp32", "bf16"} and result["tf32"].startswith("not measured")  # no TF32 on a CPU
    assert {k: rows["fp32"][k] for k in ("exact", "top1", "overlap")} == {"exact": 1.0, "top1": 1.0, "overlap": 1.0}
    assert 0.5 < rows["bf16"]["exact"] <= rows["bf16"]["overlap"] <= 1.0
