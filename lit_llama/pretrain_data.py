"""Pretraining data: a text file -> token files -> packed fixed-length blocks.

A prepared folder (written by scripts/prepare_text.py) holds
    train.bin, val.bin         every document's token ids, each followed by EOS, as one flat array
                               of little-endian integers (numpy `tofile`: no header, no pickle)
    tokenizer.model            the SentencePiece model the ids belong to
    prepare_text_meta.json     the array dtype, the vocabulary size and the counts

Blocks are cut from the flat array regardless of document boundaries ("packing"): nothing is
padded, and the EOS ids tell the model where one document ends and the next begins. A block's
labels are its input_ids; `lit_llama.training.next_token_loss` does the shift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lit_llama.json_file import read_json

META_NAME = "prepare_text_meta.json"
SPLITS = ("train", "val")
FORMAT_NAME = "lit_llama.token_file"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id: uint16 halves the file for vocabularies up to 65536."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def token_path(data_dir: Path | str, split: str) -> Path:
    return Path(data_dir) / f"{split}.bin"


def read_meta(data_dir: Path | str) -> dict[str, Any]:
    """The metadata prepare_text.py wrote; a one-line error when the folder was not prepared."""
    path = Path(data_dir) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {META_NAME} in {str(data_dir)!r}; prepare the folder with scripts/prepare_text.py first"
        )
    meta = read_json(path, remedy="prepare the data again with scripts/prepare_text.py")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} was not written by scripts/prepare_text.py; prepare the data again")
    return meta


def load_tokens(path: Path | str, dtype: np.dtype | str, vocab_size: int | None = None) -> np.ndarray:
    """A token file as a read-only memory map (1-D), so a corpus larger than RAM costs nothing to open.
    With `vocab_size`, every id is checked to be a row of the model's embedding (one pass over the
    file, at disk speed): an id outside it would be an IndexError in the middle of training."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist; run scripts/prepare_text.py first")
    dtype = np.dtype(dtype)
    if path.stat().st_size % dtype.itemsize:
        raise ValueError(f"{path} has {path.stat().st_size} bytes, not a whole number of {dtype} ids; prepare it again")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size, path)
    return tokens


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: Path | str) -> None:
    """A one-line error when a token id is outside 0..vocab_size-1."""
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(
            f"{path} holds token id {bad}, outside the model's vocabulary of {vocab_size} ids (0..{vocab_size - 1}); "
            "it was made with another tokenizer or is damaged: prepare the data again with scripts/prepare_text.py"
        )


class PretrainDataset(Dataset):
    """Blocks of `block_size` tokens from a token file; item i is dict(input_ids=(T,), labels=(T,)).

    strided: block i is tokens[i * block_size : (i + 1) * block_size], the file cut into
        non-overlapping blocks once (for validation: every token counted once, the same every time).
    random: each item starts at a fresh random offset drawn from the dataset's own generator, so
        every epoch sees different cuts of the documents (for training); the epoch length is the
        number of strided blocks, one pass over the tokens on average.
    """

    def __init__(
        self, tokens: np.ndarray | torch.Tensor, block_size: int, sampling: Literal["strided", "random"] = "strided",
        seed: int = 0,
    ) -> None:
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2 (one input and one target), got {block_size}")
        if len(tokens) < block_size:
            raise ValueError(
                f"the token file holds {len(tokens)} tokens, fewer than one block of {block_size}; "
                "use more text or a smaller --block_size"
            )
        if sampling not in ("strided", "random"):
            raise ValueError(f"sampling must be 'strided' or 'random', got {sampling!r}")
        self.tokens = tokens
        self.block_size = block_size
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_dir(
        cls, data_dir: Path | str, split: str, block_size: int, sampling: Literal["strided", "random"] = "strided",
        seed: int = 0, vocab_size: int | None = None,
    ) -> PretrainDataset:
        """The `split` ("train" or "val") of a folder prepared by scripts/prepare_text.py; with `vocab_size`,
        its ids are checked against the model's vocabulary first (`load_tokens`)."""
        meta = read_meta(data_dir)
        return cls(load_tokens(token_path(data_dir, split), meta["dtype"], vocab_size), block_size, sampling, seed)

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.sampling == "strided" and not -len(self) <= i < len(self):
            raise IndexError(f"block {i} out of range for a dataset of {len(self)} blocks")
        if self.sampling == "random":  # the index only counts draws: every item is a fresh random block
            start = int(torch.randint(len(self.tokens) - self.block_size + 1, (1,), generator=self.generator))
        else:
            start = (i % len(self)) * self.block_size
        block = torch.from_numpy(np.asarray(self.tokens[start: start + self.block_size]).astype(np.int64))  # (T,)
        return {"input_ids": block, "labels": block.clone()}
