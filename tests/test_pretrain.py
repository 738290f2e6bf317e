"""Pretraining: prepare_text.py token files, the packed-block dataset and pretrain/base.py end to end.

References are independent of our code: sentencepiece itself decodes the token files, numpy reads
them, and the checkpoint's loss is recomputed here with torch's cross-entropy.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lit_llama.checkpoint import load_model
from lit_llama.pretrain_data import PretrainDataset

REPO = Path(__file__).resolve().parents[1]
# One thread per subprocess: tiny models gain nothing from more, and threads that spin-wait on a
# busy 2-core machine slow everything down.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "park", "river", "green", "café", "naïve")


def make_text(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Paragraphs with punctuation, digits, non-ASCII letters, an emoji and inner line breaks."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20)))
        extra = rng.choice(("", f" It cost {rng.randint(0, 999)} coins.", "\nA second line 🙂.", "  Two  spaces."))
        docs.append(f"{words.capitalize()}.{extra}")
    return docs


def run_script(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert all(w in errors[0] for w in words), errors[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("text")
    docs = make_text()
    (root / "input.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    result = run_script("scripts/prepare_text.py", "--input_file", root / "input.txt", "--destination_path",
                        root / "data", "--vocab_size", "400", "--val_fraction", "0.1")
    assert result.returncode == 0, result.stderr
    return root / "data", docs


def read_ids(data_dir: Path, split: str) -> np.ndarray:
    return np.fromfile(data_dir / f"{split}.bin", dtype="<u2")


def test_token_files_decode_back_to_the_text_with_sentencepiece(prepared):
    data_dir, docs = prepared
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizer.model"))
    assert sp.vocab_size() == 400
    meta = json.loads((data_dir / "prepare_text_meta.json").read_text())
    train, val = read_ids(data_dir, "train"), read_ids(data_dir, "val")
    assert meta["dtype"] == "<u2" and (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.2  # about val_fraction, rounded to whole documents
    ids = np.concatenate([train, val]).tolist()
    # Every document is BOS ids EOS, in file order; the split falls between two documents.
    assert train[0] == sp.bos_id() and train[-1] == sp.eos_id() and val[0] == sp.bos_id()
    decoded, start = [], 0
    for end in (i for i, t in enumerate(ids) if t == sp.eos_id()):
        assert ids[start] == sp.bos_id()
        decoded.append(sp.decode(ids[start + 1: end]))
        start = end + 1
    assert start == len(ids)
    assert decoded == docs


def test_given_tokenizer_is_copied_and_used(prepared, tmp_path):
    data_dir, docs = prepared
    (tmp_path / "lines.txt").write_text("\n".join(docs[:30]), encoding="utf-8")
    result = run_script("scripts/prepare_text.py", "--input_file", tmp_path / "lines.txt", "--destination_path",
                        tmp_path / "out", "--tokenizer_path", data_dir / "tokenizer.model", "--separator", "line")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (data_dir / "tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizer.model"))
    lines = [line for doc in docs[:30] for line in doc.split("\n")]
    expected = [t for line in lines for t in [sp.bos_id(), *sp.encode(line), sp.eos_id()]]
    got = np.concatenate([read_ids(tmp_path / "out", "train"), read_ids(tmp_path / "out", "val")]).tolist()
    assert got == expected


def test_dataset_blocks_are_slices_of_the_token_file():
    tokens = np.arange(1000, dtype=np.uint16)
    strided = PretrainDataset(tokens, block_size=64, sampling="strided")
    assert len(strided) == 1000 // 64
    for i in (0, 5, len(strided) - 1):
        item = strided[i]
        assert item["input_ids"].dtype == torch.int64
        assert item["input_ids"].tolist() == list(range(64 * i, 64 * i + 64))
        assert torch.equal(item["labels"], item["input_ids"])
    with pytest.raises(IndexError):
        strided[len(strided)]
    rand = PretrainDataset(tokens, block_size=64, sampling="random", seed=3)
    starts = set()
    for i in range(50):  # more draws than strided blocks: a random item's index only counts draws
        ids = rand[i]["input_ids"]
        assert torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + 64)), "a block must be contiguous tokens"
        starts.add(int(ids[0]))
    assert len(starts) > 40  # fresh offsets, not the strided grid
    with pytest.raises(ValueError, match="fewer than one block"):
        PretrainDataset(tokens[:10], block_size=64)


PRETRAIN_FLAGS = (
    "--model_name", "tiny", "--block_size", "32", "--accelerator", "cpu", "--seed", "3", "--train.max_iters", "40",
    "--train.learning_rate", "1e-2", "--train.warmup_steps", "5", "--train.batch_size", "8",
    "--train.micro_batch_size", "8", "--train.eval_interval", "20", "--train.eval_iters", "4",
    "--train.log_interval", "5", "--train.save_interval", "20",
)


@pytest.fixture(scope="module")
def pretrained(prepared, tmp_path_factory) -> Path:
    data_dir, _ = prepared
    out = tmp_path_factory.mktemp("pretrain") / "out"
    result = run_script("pretrain/base.py", "--data_dir", data_dir, "--out_dir", out, *PRETRAIN_FLAGS)
    assert result.returncode == 0, result.stderr
    return out


def test_pretrain_loss_decreases_and_checkpoint_reloads(prepared, pretrained):
    data_dir, out = prepared[0], pretrained
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    assert losses[-1] < 0.7 * losses[0], losses  # ln(400) = 6.0 at the start
    val_losses = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert val_losses[-1] < 0.7 * val_losses[0], val_losses
    assert (out / "iter-000020-final" / "lit_config.json").is_file()

    model = load_model(out / "final")
    assert model.config.vocab_size == 400 and model.config.block_size == 32
    assert (out / "final" / "tokenizer.model").read_bytes() == (data_dir / "tokenizer.model").read_bytes()
    # The saved weights are the trained ones: the same validation loss, recomputed here over the
    # first 4 x 8 strided blocks of val.bin.
    val = torch.from_numpy(read_ids(data_dir, "val").astype(np.int64))
    n_blocks = min(32, len(val) // 32)
    blocks = val[: n_blocks * 32].view(n_blocks, 32)  # (n_blocks, T=32)
    # Validation averages the mean loss of each micro-batch of 8 blocks; do the same.
    batch_losses = []
    with torch.no_grad():
        for batch in blocks.split(8):
            logits = model(batch)
            batch_losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)))
    loss = torch.stack(batch_losses).mean()
    assert abs(loss.item() - val_losses[-1]) < 1e-4, (loss.item(), val_losses[-1])

    gen = run_script("generate/base.py", "--checkpoint_dir", out / "final", "--prompt", "The cat", "--max_new_tokens",
                     "10", "--temperature", "0", "--accelerator", "cpu")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The cat")


def test_resumed_pretraining_ends_with_the_uninterrupted_weights(prepared, pretrained, tmp_path):
    data_dir, out = prepared[0], pretrained
    state = out / "train_state" / "state-000020.json"  # after 20 of the 40 steps
    assert state.is_file()
    result = run_script("pretrain/base.py", "--data_dir", data_dir, "--out_dir", tmp_path / "resumed", *PRETRAIN_FLAGS,
                        "--resume", state)
    assert result.returncode == 0, result.stderr
    want = load_file(out / "final" / "lit_model.safetensors")
    got = load_file(tmp_path / "resumed" / "final" / "lit_model.safetensors")
    assert set(want) == set(got)
    # Random block offsets after the resume must be the ones the uninterrupted run drew.
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6


def test_cli_help_and_bad_input(prepared, tmp_path):
    for script, flag in (("scripts/prepare_text.py", "--vocab_size"), ("pretrain/base.py", "--train.max_iters")):
        help_ = run_script(script, "--help")
        assert help_.returncode == 0 and flag in help_.stdout, script
    assert_one_line_error(run_script("scripts/prepare_text.py", "--input_file", tmp_path / "missing.txt"), "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_one_line_error(run_script("scripts/prepare_text.py", "--input_file", tmp_path / "empty.txt",
                                     "--destination_path", tmp_path / "d"), "no text")
    assert_one_line_error(run_script("pretrain/base.py", "--data_dir", tmp_path, "--out_dir", tmp_path / "o"),
                          "prepare_text.py")
    data_dir, _ = prepared
    assert_one_line_error(run_script("pretrain/base.py", "--data_dir", data_dir, "--out_dir", tmp_path / "o",
                                     "--block_size", "100000", "--accelerator", "cpu"), "--block_size")
