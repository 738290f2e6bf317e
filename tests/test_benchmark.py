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
ROW = re.compile(r"^\| (?P<contender>(?:ours|transformers|llama\.cpp)/[\w-]+) \| (?P<cells>.+) \|$")
COMPARISON = re.compile(r"^\| (?P<num>\S+) / (?P<den>\S+) \| (?P<metric>[^|]+) \| (?P<ratio>[^|]+) \| (?P<target>[^|]*) \| (?P<met>[^|]*) \|$")


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
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--repeats", "1", "--threads", "1",
         "--train_variants", "[fp32]", "--generate_variants", "[ours/fp32, transformers/fp32, llama.cpp/gguf]",
         "--batch_size", "2", "--seq_len", "16", "--steps", "1", "--warmup", "0",
         "--prompt_len", "4", "--new_tokens", "4", "--gen_batch", "2", "--json_out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, generate = proc.stdout.split("## LoRA training")[1].split("## Greedy generation")
    generate, compared = generate.split("## Comparisons")
    train_rows = {m["contender"]: m["cells"].split(" | ") for m in map(ROW.match, train.splitlines()) if m}
    gen_rows = {m["contender"]: m["cells"].split(" | ") for m in map(ROW.match, generate.splitlines()) if m}
    assert set(train_rows) == {"ours/fp32", "transformers/fp32"}
    assert set(gen_rows) == {"ours/fp32", "transformers/fp32"}  # llama.cpp has no GGUF file of random weights
    assert "skipped generate llama.cpp/gguf" in proc.stdout
    for cells in train_rows.values():  # tokens/s, first step, peak RSS, MFU: min / median / max each; the loss
        assert len(cells) == 5 and all(three_numbers(c)[1] >= 0 for c in cells[:4])  # a tiny model's MFU prints 0.0
        assert three_numbers(cells[0])[1] > 0 and three_numbers(cells[2])[1] > 0  # tokens/s, peak RSS
    for cells in gen_rows.values():  # B=1 tokens/s, first token, % bandwidth, MiB/token, B=2 tokens/s, MFU, RSS
        assert len(cells) == 7 and all(three_numbers(c)[1] >= 0 for c in cells[:3] + cells[4:])
        assert three_numbers(cells[0])[1] > 0 and three_numbers(cells[4])[1] > 0 and three_numbers(cells[6])[1] > 0
        assert float(cells[3]) > 0  # MiB read per token
    # Same weights and batch: the first training loss of both implementations agrees.
    assert abs(float(train_rows["ours/fp32"][4]) - float(train_rows["transformers/fp32"][4])) < 1e-3
    # Same weights, fp32, greedy: the tokens agree.
    assert "transformers/fp32 agrees with ours/fp32 on the first 4 of 4 tokens" in proc.stdout
    ratios = [m.groupdict() for m in map(COMPARISON.match, compared.splitlines()) if m and m["num"] != "comparison"]
    pairs = {(r["num"], r["den"], r["metric"].strip()) for r in ratios}
    assert ("ours/fp32", "transformers/fp32", "train tokens/s") in pairs
    assert ("ours/fp32", "transformers/fp32", "generate B=1 tokens/s") in pairs
    # The ratio is per repeat: with one repeat, min = median = max = ours' median / theirs.
    ours_tps, ref_tps = three_numbers(train_rows["ours/fp32"][0])[1], three_numbers(train_rows["transformers/fp32"][0])[1]
    train_ratio = next(r for r in ratios if r["metric"].strip() == "train tokens/s")
    assert three_numbers(train_ratio["ratio"])[1] == pytest.approx(ours_tps / ref_tps, rel=0.02, abs=0.01)
    # The conditions are printed with the tables: threads, shapes, versions, the machine's limits, load.
    for needle in ("1 threads", "torch ", "transformers ", "peft ", "matmul peak", "memory read bandwidth", "load average",
                   "micro-batch 2 x 16"):
        assert needle in proc.stdout
    # Ours alone: rows over 8 different unmerged adapters against rows over one merged adapter.
    multi = re.search(r"bf16 ours, 2 rows over 8 different unmerged adapters .* ratio ([\d.]+) / ([\d.]+) / ([\d.]+)", proc.stdout)
    assert multi and float(multi[2]) > 0
    saved = json.loads(out.read_text())
    assert saved["read_bandwidth"] > 1e8  # bytes/s; any machine streams more than 100 MB/s
    assert len(saved["comparisons"]) == len(ratios) and len(saved["results"]["generate"]["ours/fp32"]) == 1


def test_bytes_read_per_token_counts_each_weight_once():
    """A tied head is read once (as the head); an untied model's embedding is only looked up."""
    bench = load_benchmark()
    from lit_llama.model import LLaMA, LLaMAConfig

    shape = dict(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, intermediate_size=64)
    for tied in (True, False):
        model = LLaMA(LLaMAConfig(**shape, tie_embeddings=tied))
        matmuls = 32 * 3 * 32 + 32 * 32 + 3 * 32 * 64 + 64 * 32  # qkv, proj, MLP, head
        got = bench.bytes_read_per_token(model, model.transformer.wte.weight, model.lm_head.weight)
        assert got == 4 * matmuls  # fp32


def test_benchmark_help_and_bad_input_is_one_error_line():
    help_proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_proc.returncode == 0 and "--checkpoint_dir" in help_proc.stdout and "--generate_variants" in help_proc.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: --repeats must be a positive integer, got 0"
    ]
