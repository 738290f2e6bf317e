"""SentencePiece tokenizer: text <-> token ids, plus training a new model on a text file."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

TOKENIZER_NAME = "tokenizer.model"  # a checkpoint directory's SentencePiece model
SPECIAL_TOKENS_NAME = "special_tokens.json"  # beside tokenizer.model in a checkpoint with a grown vocabulary


class Tokenizer:
    """A SentencePiece model, optionally extended with special tokens.

    `special_tokens` (e.g. ("<|user|>", "<|assistant|>")) get the ids right after the model's own
    pieces, in the order given: vocab_size, vocab_size + 1, ... `encode` cuts the text at every
    occurrence of one and encodes the pieces between them with SentencePiece, each as text of its
    own (so a word right after a special token starts a new word, as in Hugging Face's slow LLaMA
    tokenizer); `decode` writes them back as their strings. The model file is not changed: the
    adapter that learned their embeddings stores the list (lit_llama/lora.py), and whoever loads
    that adapter builds the tokenizer with it.
    """

    def __init__(self, model_path: Path | str, special_tokens: Sequence[str] = ()) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(model_path)!r} does not exist; pass a SentencePiece .model file")
        self.processor = SentencePieceProcessor(model_file=str(model_path))
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        # LLaMA's tokenizer defines no pad piece. Padded positions are always masked, so any valid
        # id works there; use the pad piece when there is one, else unk.
        self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else max(self.processor.unk_id(), 0)
        self.special_tokens = tuple(special_tokens)
        base = self.processor.vocab_size()
        self.special_ids = {token: base + i for i, token in enumerate(self.special_tokens)}
        self._check_special_tokens()
        # Longest first, so that "<|a|>x" is not split as "<|a|>" when "<|a|>x" is a token too.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def _check_special_tokens(self) -> None:
        for token in self.special_tokens:
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"special token {token!r} is empty; pass non-empty strings such as '<|user|>'")
            existing = self.processor.piece_to_id(token)
            if existing != self.processor.unk_id() or token == self.processor.id_to_piece(self.processor.unk_id()):
                raise ValueError(f"special token {token!r} is already piece {existing} of the tokenizer; use it as it is "
                                 "or choose another string")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"special tokens {list(self.special_tokens)} repeat a token; list each once")

    @property
    def vocab_size(self) -> int:
        """The SentencePiece model's pieces plus the special tokens."""
        return self.processor.vocab_size() + len(self.special_tokens)

    def encode(
        self, text: str, bos: bool = True, eos: bool = False, max_length: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Token ids of `text` as a LongTensor (T,); BOS/EOS added as asked, cut to max_length."""
        if self._special_split is None:
            ids = self.processor.encode(text)
        else:  # the split keeps the separators: odd positions hold the special tokens
            ids = []
            for i, part in enumerate(self._special_split.split(text)):
                ids += [self.special_ids[part]] if i % 2 else (self.processor.encode(part) if part else [])
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
        if not self.special_tokens:
            return self.processor.decode(ids)
        # Runs of ordinary ids decode together (SentencePiece joins their pieces); special ids in between.
        base = self.processor.vocab_size()
        text, run = [], []
        for i in ids:
            if base <= i < base + len(self.special_tokens):
                text += [self.processor.decode(run), self.special_tokens[i - base]]
                run = []
            else:
                run.append(i)
        return "".join(text + [self.processor.decode(run)])

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path | str, tokenizer_path: Path | str | None = None) -> Tokenizer:
        """The tokenizer of a checkpoint directory: its tokenizer.model, plus the special tokens a
        merged adapter left in special_tokens.json (scripts/merge_lora.py), if any."""
        extra = Path(checkpoint_dir) / SPECIAL_TOKENS_NAME
        special = json.loads(extra.read_text()) if extra.is_file() else []
        return cls(tokenizer_path or Path(checkpoint_dir) / TOKENIZER_NAME, special)

    @staticmethod
    def train(input_file: Path | str, destination: Path | str, vocab_size: int = 32000) -> Path:
        """Train a byte-fallback BPE model like LLaMA's on `input_file`; writes `destination`
        (a .model path, or a directory that receives tokenizer.model) and returns its path."""
        destination = Path(destination)
        if destination.suffix != ".model":
            destination = destination / TOKENIZER_NAME
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
