"""bench/gpu_check.sh: the prepared GPU job. ``--dry-run`` runs on a CPU machine, skips the CUDA stages with
their reason and writes at most three files into --out with every report key; the driver kills a stage
that overruns its box together with every process it started, and keeps the partial results of a stage
that fails however it fails (fake stages stand in for the real ones); pytest's output is counted with
its collection errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

REPORT_KEYS = {
    "device", "torch", "triton", "copy_gbs", "stages", "pytest", "correctness", "ops", "fastest_plans",
    "unet_step_ms", "train_memory", "end_to_end_s", "peak_reserved_gib", "vae_decode", "optical_flow_engine",
}  # fmt: skip
STAGES = {"preflight", "build", "pytest", "correctness", "ops", "unet_step", "train_memory", "end_to_end", "vae_decode", "optical_flow"}


@pytest.mark.slow
def test_dry_run_writes_three_files_with_the_full_report(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(out), "--dry-run", "--work", str(work)],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # What comes back from the GPU machine: at most 8 files; the job leaves 3.
    assert sorted(path.name for path in out.rglob("*")) == ["gpu_check_files.tar.gz", "gpu_report.json", "gpu_report.md"]
    assert (out / "gpu_report.md").read_text() in result.stdout
    with tarfile.open(out / "gpu_check_files.tar.gz") as tar:
        packed = set(tar.getnames())
    assert {f"gpu_check/stages/{name}.json" for name in STAGES} | {"gpu_check/pytest.log"} <= packed
    report = json.loads((out / "gpu_report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert set(report["stages"]) == STAGES
    for name, stage in report["stages"].items():
        assert set(stage) == {"status", "seconds", "error"}, name
        assert stage["status"] in ("ok", "failed", "skipped"), name
    failed = {name: stage["error"] for name, stage in report["stages"].items() if stage["status"] == "failed"}
    assert not failed
    for name in gpu_check.NEEDS_CUDA:
        assert "needs a CUDA device" in report["stages"][name]["error"]
    assert set(report["pytest"]) == {"passed", "failed", "skipped", "errors"}
    assert report["pytest"]["failed"] == report["pytest"]["errors"] == 0
    assert report["correctness"] and all(row["ok"] for row in report["correctness"])
    assert {"op", "shape", "dtype", "backend", "max_abs_err", "tolerance", "ok"} <= set(report["correctness"][0])
    assert report["copy_gbs"] > 0
    # The launch-plan variants ran (under the interpreter in a dry run), with both byte counts.
    attention_plans = {row["plan"] for row in report["ops"] if row["op"] == "temporal_attention" and row["plan"]}
    assert attention_plans == {f"BLOCK_P={block_p}, warps={warps}" for block_p, warps in gpu_check.ATTENTION_PLANS}
    group_norm_plans = {row["plan"] for row in report["ops"] if row["op"] == "group_norm_silu" and row["plan"]}
    assert group_norm_plans == {name for name, _override in gpu_check.GROUP_NORM_PLANS}
    for row in report["ops"]:
        if row["op"] == "group_norm_silu" and row["plan"]:
            assert 2 * row["designed_bytes"] == (2 if row["plan"] == "one-pass" else 3) * row["compulsory_bytes"]
    assert {row["op"] for row in report["fastest_plans"]} == {"group_norm_silu", "temporal_attention"}
    assert set(report["unet_step_ms"]) == {"eager", "optimized", "optimized_cuda", "optimized_cuda_graphs"}
    assert set(report["end_to_end_s"]) == set(report["peak_reserved_gib"]) == {"eager", "optimized"}


def test_the_stage_boxes_fit_the_jobs_eight_minutes() -> None:
    assert gpu_check.STAGE_SECONDS <= 420 and gpu_check.BUDGETS["unet_step"] >= 90 and gpu_check.BUDGETS["train_memory"] <= 45
    shell = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "job_seconds=480" in shell and "--no-compile" in shell


FAKE_STAGE = """
import json, os, subprocess, sys, time
from pathlib import Path

stages = Path(sys.argv[1]) / "stages"
name = os.environ["SVD_FAST_GPU_CHECK_STAGE"]
(stages / f"{name}.partial.json").write_text(json.dumps({"unet_step_ms": {"eager": 12.5}}))
if sys.argv[2] == "hang":
    # A grandchild, as the build's compilers or pytest's test processes are.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (Path(sys.argv[1]) / "child.pid").write_text(str(child.pid))
    time.sleep(600)
if sys.argv[2] == "raise":
    raise RuntimeError("the stage broke after its first result")
if sys.argv[2] == "exit":
    os._exit(9)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _fake_stage(work: Path, behaviour: str, limit: float) -> dict:
    (work / "stages").mkdir(parents=True, exist_ok=True)
    script = work / "fake_stage.py"
    script.write_text(textwrap.dedent(FAKE_STAGE))
    command = [sys.executable, str(script), str(work), behaviour]
    return gpu_check.run_stage_process(work, "unet_step", command, limit, dict(os.environ))


def test_a_stage_over_its_box_is_killed_with_its_children_and_keeps_its_partial_results(tmp_path: Path) -> None:
    record = _fake_stage(tmp_path, "hang", limit=5)
    assert record["status"] == "failed" and "timed out after 5 s" in record["error"]
    assert record["results"] == {"unet_step_ms": {"eager": 12.5}}
    child = int((tmp_path / "child.pid").read_text())
    assert not _alive(child)
    assert json.loads((tmp_path / "stages" / "unet_step.json").read_text()) == record


@pytest.mark.parametrize("behaviour", ["raise", "exit"])
def test_a_stage_that_fails_however_it_fails_keeps_its_partial_results(tmp_path: Path, behaviour: str) -> None:
    record = _fake_stage(tmp_path, behaviour, limit=120)
    assert record["status"] == "failed"
    assert "died without a report" in record["error"]
    assert record["results"] == {"unet_step_ms": {"eager": 12.5}}
    report = gpu_check.merge(tmp_path)
    assert report["stages"]["unet_step"]["status"] == "failed"
    assert report["unet_step_ms"] == {"eager": 12.5}


def test_a_stage_that_raises_inside_the_stage_runner_keeps_its_partial_results(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "stages").mkdir()
    monkeypatch.setenv("SVD_FAST_GPU_CHECK_STAGE", "vae_decode")

    def decode_then_break(work: Path, dry_run: bool) -> dict:
        gpu_check._write_partial(work, {"vae_decode": [{"decode_chunk_size": 8, "seconds": 1.5}]})
        raise MemoryError("out of memory at chunk 14")

    monkeypatch.setitem(gpu_check.STAGES, "vae_decode", decode_then_break)
    assert gpu_check.run_stage("vae_decode", tmp_path, dry_run=False) == 1
    record = gpu_check.run_stage_process(
        tmp_path, "vae_decode", [sys.executable, "-c", "pass"], 60, dict(os.environ)
    )  # the stage's own record (written above) merged with its partial file
    assert record["status"] == "failed" and "MemoryError" in record["error"]
    assert record["results"]["vae_decode"] == [{"decode_chunk_size": 8, "seconds": 1.5}]


def test_fastest_plans_names_the_fastest_plan_per_shape_beside_the_default() -> None:
    rows = [
        {"op": "temporal_attention", "shape": [2, 25], "plan": "BLOCK_P=1, warps=4", "default_plan": False, "ms": 3.0},
        {"op": "temporal_attention", "shape": [2, 25], "plan": "BLOCK_P=2, warps=2", "default_plan": True, "ms": 2.0},
        {"op": "temporal_attention", "shape": [2, 25], "plan": "BLOCK_P=4, warps=4", "default_plan": False, "ms": 1.5},
        {"op": "temporal_attention", "shape": [2, 14], "plan": "BLOCK_P=2, warps=2", "default_plan": True, "ms": 1.0},
        {"op": "temporal_attention", "shape": [2, 14], "plan": None, "default_plan": False, "ms": 0.1},
    ]
    assert gpu_check.fastest_plans(rows) == [
        {"op": "temporal_attention", "shape": [2, 25], "plan": "BLOCK_P=4, warps=4", "ms": 1.5,
         "default_plan": "BLOCK_P=2, warps=2", "default_ms": 2.0},
        {"op": "temporal_attention", "shape": [2, 14], "plan": "BLOCK_P=2, warps=2", "ms": 1.0,
         "default_plan": "BLOCK_P=2, warps=2", "default_ms": 1.0},
    ]  # fmt: skip


PYTEST_LOG = """\
============================= test session starts ==============================
collected 120 items / 1 error / 12 deselected / 108 selected

tests/test_group_norm.py::test_a[cuda] PASSED                            [  1%]
tests/test_group_norm.py::test_b[cuda] FAILED                            [  2%]
tests/test_group_norm.py::test_c[cuda] SKIPPED (no DALI)                 [  3%]
tests/test_edm_step.py::test_d[cuda] ERROR                               [  4%]
tests/test_edm_step.py::test_e[cuda] PASSED                              [  5%]
=========================== short test summary info ============================
FAILED tests/test_group_norm.py::test_b[cuda] - AssertionError
ERROR tests/test_training_validation.py - ModuleNotFoundError: No module named 'av'
ERROR tests/test_edm_step.py::test_d[cuda] - RuntimeError: setup failed
"""


def test_pytest_counts_include_collection_errors() -> None:
    assert gpu_check.pytest_counts(PYTEST_LOG) == {"passed": 2, "failed": 1, "skipped": 1, "errors": 2}
    # Cut short before the summary: the header still announces the module that failed to collect.
    header_only = "collected 120 items / 1 error / 12 deselected / 108 selected\n\ntests/test_a.py::test_a PASSED\n"
    assert gpu_check.pytest_counts(header_only)["errors"] == 1


def test_the_train_memory_stage_reports_its_measurement_against_the_plan(tmp_path: Path, monkeypatch) -> None:
    """Wiring of the train_memory stage (the measurement itself needs a GPU): skipped with its reason without
    CUDA; a measurement written before the plan's trace fails keeps its numbers in the report."""
    (tmp_path / "stages").mkdir()
    monkeypatch.setenv("SVD_FAST_GPU_CHECK_STAGE", "train_memory")
    assert "train_memory" in gpu_check.NEEDS_CUDA and gpu_check.TRAIN_MEMORY_CONFIG.is_file()
    assert gpu_check.run_stage("train_memory", tmp_path, dry_run=True) == 0
    skipped = json.loads((tmp_path / "stages" / "train_memory.json").read_text())
    assert skipped["status"] == "skipped" and "needs a CUDA device" in skipped["error"]

    measured = {"config": gpu_check.TRAIN_MEMORY_CONFIG.name, "peak_reserved_gib": 15.9, "planned_activations_gib": None}

    def measure_then_break(work: Path, dry_run: bool) -> dict:
        gpu_check._write_partial(work, {"train_memory": measured})
        raise RuntimeError("the plan's trace broke")

    monkeypatch.setitem(gpu_check.STAGES, "train_memory", measure_then_break)
    assert gpu_check.run_stage("train_memory", tmp_path, dry_run=False) == 1
    record = gpu_check.run_stage_process(tmp_path, "train_memory", [sys.executable, "-c", "pass"], 60, dict(os.environ))
    assert record["status"] == "failed" and record["results"]["train_memory"] == measured
    report = gpu_check.merge(tmp_path)
    assert report["train_memory"] == measured and "training step memory" in gpu_check.markdown(report)
