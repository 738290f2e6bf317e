"""Turn any text file into token files for pretraining (and train a tokenizer for it if needed).

    python scripts/prepare_text.py --input_file data/demo/corpus.txt --destination_path data/demo --vocab_size 512

Writes destination_path/{train.bin, val.bin, tokenizer.model, prepare_text_meta.json} (the layout is
described in lit_llama/pretrain_data.py). Each document becomes BOS + its ids + EOS, so the model
learns where texts start and end, and generation from a BOS prompt starts a fresh document.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from lit_llama.checkpoint import TOKENIZER_NAME, atomic_copy, atomic_path, atomic_write_text
from lit_llama.cli import run
from lit_llama.pretrain_data import FORMAT_NAME, META_NAME, token_dtype, token_path
from lit_llama.tokenizer import Tokenizer


def split_documents(text: str, separator: Literal["blank_line", "line", "none"]) -> list[str]:
    """The non-empty documents of `text`: paragraphs (blank_line), lines (line) or the whole text (none)."""
    if separator == "none":
        docs = [text]
    elif separator == "line":
        docs = text.split("\n")
    else:
        docs = [doc.strip("\n") for doc in text.replace("\r\n", "\n").split("\n\n")]
    return [doc for doc in docs if doc.strip()]


def encode_documents(tokenizer: Tokenizer, docs: list[str], chunk: int = 1024) -> list[np.ndarray]:
    """Each document as BOS + ids + EOS, encoded in chunks (SentencePiece encodes a list at once)."""
    encoded = []
    with tqdm(total=len(docs), desc="encoding", unit="doc", file=sys.stderr) as bar:
        for start in range(0, len(docs), chunk):
            for ids in tokenizer.processor.encode(docs[start: start + chunk]):
                encoded.append(np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=np.int64))
            bar.update(min(chunk, len(docs) - start))
    return encoded


def train_tokenizer(input_file: Path, destination: Path, vocab_size: int) -> Path:
    """Train a SentencePiece model on `input_file` and move it into place atomically."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
        try:
            trained = Tokenizer.train(input_file, Path(tmp) / TOKENIZER_NAME, vocab_size=vocab_size)
        except RuntimeError as e:  # sentencepiece reports a vocabulary too large for the text this way
            raise ValueError(
                f"cannot train a {vocab_size}-piece tokenizer on {input_file} ({str(e).strip().splitlines()[-1][:160]}); "
                "pass a smaller --vocab_size or more text"
            ) from None
        atomic_copy(trained, destination)
    return destination


def main(
    input_file: Path | None = None,
    destination_path: Path = Path("data/text"),
    tokenizer_path: Path | None = None,
    vocab_size: int = 512,
    val_fraction: float = 0.05,
    separator: Literal["blank_line", "line", "none"] = "blank_line",
) -> dict:
    """Tokenize a UTF-8 text file into train.bin / val.bin for pretrain/base.py.

    Args:
        input_file: The text to pretrain on (UTF-8); required.
        destination_path: Folder that receives train.bin, val.bin, tokenizer.model and prepare_text_meta.json.
        tokenizer_path: An existing SentencePiece .model to use; default: train a new one on input_file.
        vocab_size: Size of the tokenizer trained when no tokenizer_path is given (at least 260: 256 byte pieces + specials).
        val_fraction: Share of the tokens (whole documents, the last ones) held out as val.bin.
        separator: What separates documents in the file: a blank line, every line break, or nothing (one document).
    """
    if input_file is None:
        raise ValueError("pass --input_file: the UTF-8 text file to pretrain on")
    if not input_file.is_file():
        raise FileNotFoundError(f"--input_file {str(input_file)!r} does not exist")
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be between 0 and 1 (e.g. 0.05), got {val_fraction}")
    if tokenizer_path is None and vocab_size < 260:
        raise ValueError(f"--vocab_size {vocab_size} is too small: 256 byte pieces and 3 special ids come first; pass 260 or more")
    if destination_path.exists() and not destination_path.is_dir():
        raise ValueError(f"--destination_path {str(destination_path)!r} is a file; pass a directory")
    try:
        text = input_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--input_file {str(input_file)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = split_documents(text, separator)
    if not docs:
        raise ValueError(f"--input_file {str(input_file)!r} holds no text")

    t0 = time.perf_counter()
    destination_path.mkdir(parents=True, exist_ok=True)
    tok_dest = destination_path / TOKENIZER_NAME
    if tokenizer_path is None:
        train_tokenizer(input_file, tok_dest, vocab_size)
        print(f"trained a {vocab_size}-piece tokenizer in {time.perf_counter() - t0:.1f} s")
    elif tokenizer_path.resolve() != tok_dest.resolve():
        Tokenizer(tokenizer_path)  # fail early on a file that is not a SentencePiece model
        atomic_copy(tokenizer_path, tok_dest)
    tokenizer = Tokenizer(tok_dest)

    encoded = encode_documents(tokenizer, docs)
    lengths = np.array([len(ids) for ids in encoded])
    all_ids = np.concatenate(encoded)
    # Hold out the last whole documents that make up val_fraction of the tokens; one long document
    # is cut at the token position instead.
    target = int(len(all_ids) * (1 - val_fraction))
    ends = np.cumsum(lengths)
    cut = int(ends[np.searchsorted(ends, target)]) if len(docs) > 1 else target
    if cut >= len(all_ids):
        cut = int(ends[-2]) if len(docs) > 1 else target
    splits = {"train": all_ids[:cut], "val": all_ids[cut:]}
    if min(len(ids) for ids in splits.values()) == 0:
        raise ValueError(f"{input_file} is too short to split into train and val; add text or raise --val_fraction")

    dtype = token_dtype(tokenizer.vocab_size)
    for split, ids in splits.items():
        with atomic_path(token_path(destination_path, split)) as tmp:
            ids.astype(dtype).tofile(tmp)
    meta = {
        "format": FORMAT_NAME, "dtype": dtype.str, "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "tokenizer_sha256": hashlib.sha256(tok_dest.read_bytes()).hexdigest(),
        "source": str(input_file), "separator": separator, "documents": len(docs),
        "train_tokens": len(splits["train"]), "val_tokens": len(splits["val"]),
    }
    atomic_write_text(destination_path / META_NAME, json.dumps(meta, indent=2) + "\n")
    elapsed = time.perf_counter() - t0
    print(f"{len(docs):,} documents, {len(text):,} characters -> {len(all_ids):,} tokens "
          f"({len(text) / len(all_ids):.2f} characters/token, vocabulary {tokenizer.vocab_size})")
    print(f"train: {len(splits['train']):,} tokens, val: {len(splits['val']):,} tokens ({dtype.name})")
    print(f"wrote {destination_path}/{{train.bin,val.bin,{TOKENIZER_NAME},{META_NAME}}} in {elapsed:.1f} s")
    return meta


if __name__ == "__main__":
    run(main)
