"""scripts/benchmark.py end to end on a tiny config (both implementations, each in its subprocess),
its table parsed back. Not a speed test: the numbers of a tiny run mean nothing."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"
ROW = re.compile(r"^\| (?P<task>[^|]+) \| (?P<dtype>bf16|fp32) \| (?P<metric>[^|]+) \| (?P<ours>[^|]+) \| (?P<ref>[^|]+) \| (?P<ratio>[^|]+) \|$")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def three_numbers(cell: str) -> list[float]:
    parts = [float(x) for x in cell.split(" / ")]
    assert len(parts) == 3 and parts[0] <= parts[1] <= parts[2], cell  # min / median / max
    return parts


def test_benchmark_runs_ours_and_transformers_peft_on_a_tiny_config(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--dtype", "fp32", "--repeats", "1", "--threads", "1",
         "--batch_size", "2", "--seq_len", "16", "--steps", "1", "--warmup", "0",
         "--prompt_len", "4", "--new_tokens", "4", "--gen_batch", "2", "--json_out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [m.groupdict() for m in map(ROW.match, proc.stdout.splitlines()) if m and m["task"] != "task"]
    metrics = {(r["task"].strip(), r["metric"].strip()) for r in rows}
    assert metrics == {
        ("LoRA train 2x16", "tokens/s"), ("LoRA train 2x16", "first step (s)"), ("LoRA train 2x16", "peak RSS (MiB)"),
        ("LoRA train 2x16", "MFU (%)"),
        ("greedy decode B=1", "tokens/s"), ("greedy decode B=1", "time to first token (ms)"), ("greedy decode B=1", "MFU (%)"),
        ("greedy decode B=1", "weights streamed (% of read bandwidth)"),
        ("greedy generate B=2", "tokens/s"), ("greedy generate B=2", "time to first token (ms)"),
        ("greedy generate B=2", "MFU (%)"), ("generate (both runs)", "peak RSS (MiB)"),
    }
    for r in rows:
        ours, ref, ratio = three_numbers(r["ours"]), three_numbers(r["ref"]), three_numbers(r["ratio"])
        assert min(ours + ref) >= 0 and ratio[0] >= 0
        if r["metric"].strip() in ("tokens/s", "peak RSS (MiB)"):
            assert ours[1] > 0 and ref[1] > 0
    # The conditions are printed with the table: threads, dtype, shapes, versions, matmul peak, load.
    for needle in ("1 threads", "torch ", "transformers ", "peft ", "matmul peak", "memory read bandwidth", "load average", "micro-batch 2 x 16"):
        assert needle in proc.stdout
    # Same weights and batch: the first training loss of both implementations agrees.
    losses = re.search(r"first-step loss ours ([\d.]+), reference ([\d.]+)", proc.stdout)
    assert losses and abs(float(losses[1]) - float(losses[2])) < 1e-3
    # Ours alone: rows over 8 different unmerged adapters against rows over one merged adapter.
    multi = re.search(r"fp32 ours, 2 rows over 8 different unmerged adapters .* ratio ([\d.]+) / ([\d.]+) / ([\d.]+)", proc.stdout)
    assert multi and float(multi[2]) > 0
    # Both rooflines are tokens/s times a constant: their ours/reference ratios are the tokens/s ratio.
    by_metric = {(r["task"].strip(), r["metric"].strip()): three_numbers(r["ratio"]) for r in rows}
    for roofline in ("MFU (%)", "weights streamed (% of read bandwidth)"):
        assert by_metric["greedy decode B=1", roofline] == by_metric["greedy decode B=1", "tokens/s"]
    saved = json.loads(out.read_text())
    assert saved["read_bandwidth"] > 1e8  # bytes/s; any machine streams more than 100 MB/s
    assert len(saved["rows"]) == len(rows) and len(saved["multi_adapter"]["fp32"]) == 1


def test_benchmark_help_and_bad_input_is_one_error_line():
    help_proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_proc.returncode == 0 and "--preset" in help_proc.stdout and "--compile" in help_proc.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: --repeats must be a positive integer, got 0"
    ]
