"""finetune/lora.py end to end on a tiny model and the real Alpaca sample, then generate/lora.py and
scripts/merge_lora.py on its output, and finetune/full.py on the same data."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_llama.adapter import apply_adapter, load_adapter
from lit_llama.checkpoint import load_model, save_checkpoint
from lit_llama.lora import load_lora_model
from lit_llama.model import LLaMA, LLaMAConfig, init_weights
from lit_llama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = DATA / "alpaca_data_first400.json"
TOKENIZER = DATA / "llama-tokenizer.model"
pytestmark = pytest.mark.skipif(
    not (ALPACA.is_file() and TOKENIZER.is_file()), reason="needs ../shared/data (Alpaca sample, LLaMA tokenizer)"
)


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    config = LLaMAConfig.from_name("tiny", vocab_size=32000, block_size=128)
    model = LLaMA(config)
    init_weights(model)
    save_checkpoint(model, tmp / "base", tokenizer_path=TOKENIZER)
    run("scripts/prepare_alpaca.py", "--data_file", ALPACA, "--checkpoint_dir", tmp / "base",
        "--destination_path", tmp / "data", "--test_size", 40, "--max_seq_length", 128)
    return tmp


def losses(metrics_csv: Path, column: str) -> list[float]:
    with open(metrics_csv) as f:
        return [float(row[column]) for row in csv.DictReader(f) if row[column]]


def test_lora_finetune_trains_saves_only_lora_and_generates(workdir):
    out = workdir / "lora"
    proc = run(
        "finetune/lora.py", "--data_dir", workdir / "data", "--checkpoint_dir", workdir / "base", "--out_dir", out,
        "--precision", "32-true", "--accelerator", "cpu", "--train.max_iters", 24, "--train.batch_size", 4,
        "--train.micro_batch_size", 2, "--train.learning_rate", 1e-2, "--train.warmup_steps", 2,
        "--train.eval_interval", 12, "--train.eval_iters", 4, "--train.save_interval", 12, "--lora.dropout", 0.0,
    )
    train_losses = losses(out / "metrics.csv", "train_loss")
    val_losses = losses(out / "metrics.csv", "val_loss")
    assert len(train_losses) == 24 and len(val_losses) == 3  # before training, at step 12 and at step 24
    # A random base gives near-uniform logits (loss ~ ln 32000 = 10.37) that LoRA on Q and V moves
    # slowly; a no-op adapter would leave the validation loss exactly where it started.
    assert val_losses[2] < val_losses[1] < val_losses[0] and val_losses[0] - val_losses[2] > 0.01, val_losses
    assert "sample:" in proc.stderr and "tokens/s" in proc.stdout + proc.stderr

    adapter = out / "lit_model.lora.safetensors"
    assert (out / "iter-000012-lit_model.lora.safetensors").is_file()
    hparams = json.loads((out / "hparams.json").read_text())
    assert hparams["lora"]["r"] == 8 and hparams["train"]["max_iters"] == 24
    tensors, meta = load_adapter(adapter)
    assert all(k.endswith(("lora_A", "lora_B")) for k in tensors)
    config = LLaMAConfig.from_name("tiny", vocab_size=32000, block_size=128)
    r, C, n_layer = 8, config.n_embd, config.n_layer
    expected_numel = n_layer * (2 * r * C + 2 * C * r)  # Q and V: A (2r, C), B (2C, r)
    assert sum(t.numel() for t in tensors.values()) == expected_numel
    assert adapter.stat().st_size < expected_numel * 4 + 4096  # fp32 tensors + a small header
    assert meta.prompt_style == "alpaca" and meta.lora.r == 8

    # generate/lora.py prints a response; merge_lora.py gives a checkpoint with the same logits.
    gen = run("generate/lora.py", "--checkpoint_dir", workdir / "base", "--lora_path", adapter,
              "--prompt", "Name a color.", "--max_new_tokens", 8, "--temperature", 0, "--accelerator", "cpu")
    assert "tokens/s" in gen.stderr and "### Response" not in gen.stdout
    compiled = run("generate/lora.py", "--checkpoint_dir", workdir / "base", "--lora_path", adapter, "--compile", "true",
                   "--prompt", "Name a color.", "--max_new_tokens", 8, "--temperature", 0, "--accelerator", "cpu")
    assert compiled.stdout == gen.stdout and "Compiled the decode step" in compiled.stderr  # same greedy answer
    # Two adapters answer side by side, unmerged, in one batch over packed base layers (row-by-row
    # equality with merged adapters: tests/test_multi_adapter.py, on weights with no near-ties).
    both = run("generate/lora.py", "--checkpoint_dir", workdir / "base", "--lora_path", out / "iter-000012-lit_model.lora.safetensors",
               "--lora_path", adapter, "--prompt", "Name a color.", "--max_new_tokens", 8, "--temperature", 0,
               "--accelerator", "cpu")
    assert both.stdout.count("### ") == 2 and f"### {adapter}" in both.stdout and "Packed" in both.stderr
    run("scripts/merge_lora.py", "--checkpoint_dir", workdir / "base", "--lora_path", adapter,
        "--output_dir", workdir / "merged")
    merged = load_model(workdir / "merged")
    unmerged = load_lora_model(workdir / "base", meta.lora)
    apply_adapter(unmerged, adapter)
    x = torch.randint(0, 32000, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged(x), rtol=0, atol=1e-5)
        assert (merged(x) - load_model(workdir / "base")(x)).abs().max() > 1e-3  # the adapter changed something


def test_special_tokens_grow_the_vocabulary_train_their_rows_and_travel_with_the_adapter(workdir, tmp_path):
    records = [{"instruction": f"<|user|>Name color number {i}.", "input": "", "output": f"Color {i % 3}<|end|>"}
               for i in range(24)]
    (tmp_path / "chat.json").write_text(json.dumps(records))
    run("scripts/prepare_json.py", "--data_file", tmp_path / "chat.json", "--checkpoint_dir", workdir / "base",
        "--destination_path", tmp_path / "data", "--test_size", 4, "--max_seq_length", 64,
        "--special_tokens", '["<|user|>", "<|end|>"]')
    prepared = json.loads((tmp_path / "data" / "prepare_meta.json").read_text())
    assert json.loads(prepared["special_tokens"]) == ["<|user|>", "<|end|>"] and prepared["tokenizer_vocab_size"] == 32002

    out = tmp_path / "lora"
    proc = run("finetune/lora.py", "--data_dir", tmp_path / "data", "--checkpoint_dir", workdir / "base", "--out_dir", out,
               "--precision", "32-true", "--accelerator", "cpu", "--train.max_iters", 4, "--train.batch_size", 4,
               "--train.micro_batch_size", 4, "--train.learning_rate", 1e-2, "--train.warmup_steps", 1,
               "--train.eval_interval", 4, "--train.eval_iters", 1)
    assert "2 special tokens from the data" in proc.stdout + proc.stderr
    tensors, meta = load_adapter(out / "lit_model.lora.safetensors")
    assert meta.special_tokens == ("<|user|>", "<|end|>") and meta.lora.resize_vocab == 32002
    assert meta.lora.train_embedding and meta.lora.train_head
    base = load_model(workdir / "base")
    wte, head = tensors["transformer.wte.weight"], tensors["lm_head.weight"]
    assert wte.shape == head.shape == (32002, base.config.n_embd)
    start = base.transformer.wte.weight.mean(0)  # where the new rows began (resize_token_embeddings)
    assert (wte[32000] - start).abs().max() > 1e-3 and (wte[32001] - start).abs().max() > 1e-3  # they were trained

    # generate/lora.py builds the tokenizer with the adapter's special tokens: "<|end|>" is one id again.
    gen = run("generate/lora.py", "--checkpoint_dir", workdir / "base", "--lora_path", out / "lit_model.lora.safetensors",
              "--prompt", "<|user|>Name color number 3.", "--max_new_tokens", 4, "--temperature", 0, "--accelerator", "cpu")
    assert "tokens/s" in gen.stderr
    # Merged, the checkpoint keeps the list beside tokenizer.model, for generate/base.py and evaluate.py.
    run("scripts/merge_lora.py", "--checkpoint_dir", workdir / "base", "--lora_path", out / "lit_model.lora.safetensors",
        "--output_dir", tmp_path / "merged")
    assert Tokenizer.from_checkpoint(tmp_path / "merged").encode("<|user|>Hi<|end|>", bos=False).tolist()[::2] == [32000, 32001]
    assert load_model(tmp_path / "merged").config.vocab_size == 32002
    full = subprocess.run([sys.executable, "finetune/full.py", "--data_dir", str(tmp_path / "data"), "--checkpoint_dir",
                           str(workdir / "base"), "--out_dir", str(tmp_path / "full"), "--accelerator", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert full.returncode != 0 and "Traceback" not in full.stderr
    assert "special tokens" in full.stderr.strip().splitlines()[-1]


def test_full_finetune_writes_a_loadable_checkpoint_and_learns(workdir):
    out = workdir / "full"
    run(
        "finetune/full.py", "--data_dir", workdir / "data", "--checkpoint_dir", workdir / "base", "--out_dir", out,
        "--accelerator", "cpu", "--train.max_iters", 12, "--train.batch_size", 4, "--train.micro_batch_size", 4,
        "--train.learning_rate", 3e-3, "--train.warmup_steps", 2, "--train.eval_interval", 12, "--train.eval_iters", 2,
    )
    train_losses = losses(out / "metrics.csv", "train_loss")
    assert sum(train_losses[-3:]) / 3 < sum(train_losses[:3]) / 3 - 0.1, train_losses
    model = load_model(out / "final")
    assert (out / "final" / "tokenizer.model").is_file()
    base = load_model(workdir / "base")
    assert not torch.equal(model.transformer.h[0].mlp.c_fc1.weight, base.transformer.h[0].mlp.c_fc1.weight)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.micro_batch_size", "3", "--train.batch_size", "4"], "multiple of micro_batch_size"),
        (["--lora.r", "0"], "lora r"),
        (["--train.batch_size", "0"], "batch_size"),
        (["--precision", "16-mixed", "--accelerator", "cpu"], "needs a GPU"),
        pytest.param(["--precision", "16-mixed"], "needs a GPU", id="16-mixed-auto-accelerator",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the GPU there")),
    ],
)
def test_lora_finetune_bad_input_is_one_clear_line(workdir, args, message):
    proc = subprocess.run(
        [sys.executable, "finetune/lora.py", "--data_dir", str(workdir / "data"), "--checkpoint_dir",
         str(workdir / "base"), "--out_dir", str(workdir / "bad"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_finetune_without_prepared_data_says_what_to_run(workdir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "finetune/lora.py", "--data_dir", str(tmp_path / "nothing"), "--checkpoint_dir",
         str(workdir / "base"), "--accelerator", "cpu", "--out_dir", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "prepare_alpaca.py" in proc.stderr.strip().splitlines()[-1]


def test_a_run_owns_its_out_dir_and_overwrite_starts_it_afresh(workdir, tmp_path):
    """A second fresh run into a used out_dir is refused (it would prune the first run's states and
    resume would mix the two); --overwrite true replaces the earlier run's states and metrics."""
    out = tmp_path / "run"
    args = ["--train.max_iters", "2", "--train.batch_size", "2", "--train.micro_batch_size", "2", "--train.eval_iters", "1",
            "--train.save_interval", "1", "--train.warmup_steps", "1", "--precision", "32-true", "--accelerator", "cpu"]
    first = run("finetune/lora.py", "--data_dir", workdir / "data", "--checkpoint_dir", workdir / "base", "--out_dir", out, *args)
    assert first.returncode == 0, first.stderr[-2000:]
    (out / "notes.txt").write_text("mine")
    again = subprocess.run([sys.executable, "finetune/lora.py", "--data_dir", str(workdir / "data"), "--checkpoint_dir",
                            str(workdir / "base"), "--out_dir", str(out), *args], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "holds an earlier run" in again.stderr and "Traceback" not in again.stderr
    fresh = run("finetune/lora.py", "--data_dir", workdir / "data", "--checkpoint_dir", workdir / "base", "--out_dir", out,
                *args, "--train.learning_rate", "1e-3", "--overwrite", "true")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert json.loads((out / "hparams.json").read_text())["train"]["learning_rate"] == 1e-3
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files were replaced
