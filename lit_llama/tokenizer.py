"""SentencePiece tokenizer: text <-> token ids, plus training a new model on a text file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from sentencepiece import SentencePieceProcessor, SentencePieceTrainer


class Tokenizer:
    def __init__(self, model_path: Path | str) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(model_path)!r} does not exist; pass a SentencePiece .model file")
        self.processor = SentencePieceProcessor(model_file=str(model_path))
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        # LLaMA's tokenizer defines no pad piece. Padded positions are always masked, so any valid
        # id works there; use the pad piece when there is one, else unk.
        self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else max(self.processor.unk_id(), 0)

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    def encode(
        self, text: str, bos: bool = True, eos: bool = False, max_length: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Token ids of `text` as a LongTensor (T,); BOS/EOS added as asked, cut to max_length."""
        ids = self.processor.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        if max_length is not None:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.processor.decode(ids)

    @staticmethod
    def train(input_file: Path | str, destination: Path | str, vocab_size: int = 32000) -> Path:
        """Train a byte-fallback BPE model like LLaMA's on `input_file`; writes `destination`
        (a .model path, or a directory that receives tokenizer.model) and returns its path."""
        destination = Path(destination)
        if destination.suffix != ".model":
            destination = destination / "tokenizer.model"
        destination.parent.mkdir(parents=True, exist_ok=True)
        if not Path(input_file).is_file():
            raise FileNotFoundError(f"text file {str(input_file)!r} does not exist; pass the corpus to train the tokenizer on")
        # Train under a temporary prefix and rename, so a crash never leaves a half-written model.
        prefix = destination.with_name(f".{destination.stem}.training")
        SentencePieceTrainer.train(
            input=str(input_file),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=1.0,
            num_threads=1,  # deterministic merges
            minloglevel=2,
            train_extremely_large_corpus=False,
        )
        Path(f"{prefix}.vocab").unlink(missing_ok=True)
        os.replace(f"{prefix}.model", destination)
        return destination
