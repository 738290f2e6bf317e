"""scripts/gpu_check.sh end to end on the CPU (GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1): every step of the
chain runs or is reported as skipped, the report's figures agree with the settings the steps ran with
and with the scripts' own files, and a failing step is reported without stopping the script."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("prepare_demo", "prepare_text", "pretrain", "prepare_json", "lora", "qlora_nf4", "lora_fsdp",
         "generate", "generate_int8", "generate_int4", "generate_compile")
NEEDS_CUDA = {"lora_fsdp", "generate_compile"}
# The sizes scripts/gpu_check.sh uses with GPU_CHECK_SMALL=1
SMALL_STEPS, SMALL_MICRO, SMALL_BLOCK, SMALL_NEW_TOKENS = 2, 4, 64, 16


def gpu_check(tmp: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    environment = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SMALL": "1", "GPU_CHECK_WORK": str(tmp / "work"),
                   "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **env}
    environment.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp / "out")], env=environment,
                          capture_output=True, text=True, timeout=300)
    report = tmp / "out" / "gpu_check.json"
    assert report.is_file(), proc.stderr[-3000:]
    return proc, json.loads(report.read_text())


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc, report = gpu_check(tmp)
    return proc, report, tmp


def test_every_step_runs_or_is_skipped_for_cuda(cpu_run) -> None:
    proc, report, _ = cpu_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["ok"] is True
    assert tuple(report["steps"]) == STEPS
    for name, step in report["steps"].items():
        if name in NEEDS_CUDA:
            assert step == {**step, "status": "skipped", "reason": "needs CUDA"}
        else:
            assert step["status"] == "ok" and step["exit_code"] == 0, (name, step)
            assert isinstance(step["wall_s"], float) and step["wall_s"] > 0
            assert isinstance(step["peak_memory_mib"], float) and step["peak_memory_mib"] > 0
            assert "stderr_tail" not in step
    assert report["environment"]["device"] == "cpu"
    assert report["base_model"].startswith("pretrained stand-in")
    assert (tmp_out := Path(cpu_run[2] / "out" / "gpu_check.log")).is_file() and "===== 03-pretrain" in tmp_out.read_text()


def test_training_figures_match_the_runs(cpu_run) -> None:
    _, report, tmp = cpu_run
    for name, out_dir in (("pretrain", "pretrain"), ("lora", "lora"), ("qlora_nf4", "qlora")):
        step = report["steps"][name]
        assert step["precision"] == "32-true" and step["steps"] == SMALL_STEPS
        with open(tmp / "work" / out_dir / "metrics.csv", newline="") as f:
            logged = [float(r["tokens_per_sec"]) for r in csv.DictReader(f) if r["tokens_per_sec"]]
        assert len(logged) == SMALL_STEPS
        assert step["tokens_per_sec"] == logged[1]  # the median of the rows after the first: one row here
        # the "Done:" line rounds the time to 0.1 s and tokens/s to 1: compare where the rounding leaves a figure
        assert step["tokens_per_sec_overall"] > 0
        if step["train_s"] >= 0.5:  # the true time is within 0.05 s of the printed one
            rel = 0.05 / (step["train_s"] - 0.05) + 1 / step["tokens_per_sec_overall"]
            assert step["tokens_per_sec_overall"] == pytest.approx(step["tokens"] / step["train_s"], rel=rel)
    # Pretraining trains on whole blocks: steps x batch x block_size tokens exactly
    assert report["steps"]["pretrain"]["tokens"] == SMALL_STEPS * SMALL_MICRO * SMALL_BLOCK


def test_generation_figures_match_the_runs(cpu_run) -> None:
    _, report, _ = cpu_run
    for name in ("generate", "generate_int8", "generate_int4"):
        step = report["steps"][name]
        assert step["peak_memory_source"] == "generate/base.py"
        assert 1 <= step["tokens"] <= SMALL_NEW_TOKENS
        # the script rounds tokens/s to 0.1 and the time to 0.01 s (a fast machine generates them in 0.01-0.02 s)
        assert step["tokens_per_sec"] > 0
        if step["generate_s"] >= 0.01:  # the true time is within 0.005 s of the printed one
            rel = 0.005 / (step["generate_s"] - 0.005) + 0.001
            assert step["tokens_per_sec"] == pytest.approx(step["tokens"] / step["generate_s"], rel=rel, abs=0.1)
        assert step["load_s"] >= 0
    assert "--quantize int4" in report["steps"]["generate_int4"]["command"]


def test_a_failing_step_is_reported_and_the_rest_goes_on(tmp_path: Path) -> None:
    """A file that is not a GGUF: its conversion fails, the steps that need the converted model are
    skipped, and the report is written all the same, with the failure's exit code and stderr."""
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a gguf file\n")
    proc, report = gpu_check(tmp_path, GPU_CHECK_GGUF=str(junk))
    assert proc.returncode == 1
    steps = report["steps"]
    assert report["ok"] is False and report["base_model"].startswith("SmolLM2-135M-Instruct converted from")
    assert [steps[n]["status"] for n in ("prepare_demo", "prepare_text", "pretrain")] == ["ok"] * 3
    failed = steps["convert_gguf"]
    assert failed["status"] == "failed" and failed["exit_code"] == 2
    assert "error:" in failed["stderr_tail"]
    assert steps["prepare_json"]["reason"] == "needs base/lit_config.json, which an earlier step did not write"
    for name in ("lora", "qlora_nf4", "generate", "generate_int8", "generate_int4"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"].endswith("which an earlier step did not write"), name
