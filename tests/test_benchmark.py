"""scripts/benchmark.py end to end on a tiny config (both implementations, each in its subprocess),
its table parsed back; and its skip-masked loss against torch's cross-entropy over the full logits.
Not a speed test: the numbers of a tiny run mean nothing."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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
        ("greedy generate B=2", "tokens/s"), ("greedy generate B=2", "time to first token (ms)"),
        ("greedy generate B=2", "MFU (%)"), ("generate (both runs)", "peak RSS (MiB)"),
    }
    for r in rows:
        ours, ref, ratio = three_numbers(r["ours"]), three_numbers(r["ref"]), three_numbers(r["ratio"])
        assert min(ours + ref) >= 0 and ratio[0] >= 0
        if r["metric"].strip() in ("tokens/s", "peak RSS (MiB)"):
            assert ours[1] > 0 and ref[1] > 0
    # The conditions are printed with the table: threads, dtype, shapes, versions, matmul peak, load.
    for needle in ("1 threads", "torch ", "transformers ", "peft ", "matmul peak", "load average", "micro-batch 2 x 16"):
        assert needle in proc.stdout
    # Same weights and batch: the first training loss of both implementations agrees.
    losses = re.search(r"first-step loss ours ([\d.]+), reference ([\d.]+)", proc.stdout)
    assert losses and abs(float(losses[1]) - float(losses[2])) < 1e-3
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(rows)


def test_benchmark_help_and_bad_input_is_one_error_line():
    help_proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_proc.returncode == 0 and "--preset" in help_proc.stdout and "--compile" in help_proc.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: --repeats must be a positive integer, got 0"
    ]


@pytest.mark.parametrize("frozen_head", [True, False])
def test_skip_masked_loss_matches_torch_cross_entropy_on_full_logits(frozen_head):
    """Loss and gradient of the chunked, skip-masked loss (fused head path when the head is
    frozen, plain autograd otherwise) against F.cross_entropy over every position's logits."""
    bench = load_benchmark()
    from lit_llama.model import LLaMA, LLaMAConfig

    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.lm_head.weight.requires_grad_(not frozen_head)
    idx = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = idx.clone()
    labels[0, :7] = -100  # a masked prompt
    labels[1, 12:] = -100  # padding
    labels[2, :] = -100  # a row without any target

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    got = bench.next_token_loss_skip_masked(model, idx, labels, chunk_size=5)  # several chunks
    logits = model(idx)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for g, e in zip(grads(got), grads(expected)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)

    all_masked = torch.full_like(labels, -100)
    zero = bench.next_token_loss_skip_masked(model, idx, all_masked)
    assert zero.item() == 0.0  # not the NaN of 0/0
