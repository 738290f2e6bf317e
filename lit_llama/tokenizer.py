"""Tokenizers: text <-> token ids, plus training a new SentencePiece model on a text file.

Two backends behind one interface (encode, decode, vocab_size, bos_id, eos_id, pad_id, stop_ids,
add_bos, chat_template): `Tokenizer` reads a SentencePiece `tokenizer.model` (LLaMA, Llama 2,
TinyLlama, models trained here), `HFTokenizer` reads a Hugging Face `tokenizer.json` with the
`tokenizers` library (Llama 3, SmolLM2, ...). `Tokenizer.from_checkpoint(dir)` picks the one the
folder holds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import tokenizers
import torch
from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

from lit_llama.json_file import read_json

TOKENIZER_NAME = "tokenizer.model"  # a checkpoint directory's SentencePiece model
SPECIAL_TOKENS_NAME = "special_tokens.json"  # beside tokenizer.model in a checkpoint with a grown vocabulary
HF_TOKENIZER_NAME = "tokenizer.json"  # a Hugging Face checkpoint's tokenizer (the `tokenizers` format)
# A Hugging Face tokenizer: tokenizer.json and the files that name its special tokens, BOS/EOS, stop ids and
# chat template (HFTokenizer also reads config.json's bos/eos_token_id). Converters copy these that exist.
HF_TOKENIZER_FILES = (HF_TOKENIZER_NAME, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "generation_config.json")


class Tokenizer:
    """A SentencePiece model, optionally extended with special tokens.

    `special_tokens` (e.g. ("<|user|>", "<|assistant|>")) get the ids right after the model's own
    pieces, in the order given: vocab_size, vocab_size + 1, ... `encode` cuts the text at every
    occurrence of one and encodes the pieces between them with SentencePiece, each as text of its
    own (so a word right after a special token starts a new word, as in Hugging Face's slow LLaMA
    tokenizer); `decode` writes them back as their strings. The model file is not changed: the
    adapter that learned their embeddings stores the list (lit_llama/lora.py), and whoever loads
    that adapter builds the tokenizer with it.

    `add_bos` is always True here: `encode(text, bos=True)` prepends BOS, as LLaMA needs.
    `stop_ids` is `(eos_id,)` and `chat_template` is None (a .model file carries neither).
    """

    add_bos = True
    chat_template: str | None = None

    def __init__(self, model_path: Path | str, special_tokens: Sequence[str] = ()) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(model_path)!r} does not exist; pass a SentencePiece .model file")
        self.path = model_path  # the file read, e.g. for a hash of it
        try:
            self.processor = SentencePieceProcessor(model_file=str(model_path))
        except RuntimeError as e:  # a truncated, empty or foreign file: sentencepiece's parse error
            raise ValueError(f"tokenizer {str(model_path)!r} is not a SentencePiece model sentencepiece can read "
                             f"({str(e).strip()[:120]}); it is damaged or incomplete: copy it again") from None
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
        self.stop_ids: tuple[int, ...] = (self.eos_id,)

    def _check_special_tokens(self) -> None:
        for token in self.special_tokens:
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"special token {token!r} is empty; pass non-empty strings such as '<|user|>'")
            existing = self._existing_id(token)
            if existing is not None:
                raise ValueError(f"special token {token!r} is already {self._unit} {existing} of the tokenizer; use it as "
                                 "it is or choose another string")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"special tokens {list(self.special_tokens)} repeat a token; list each once")

    _unit = "piece"  # what the vocabulary's entries are called, for the message above

    def _existing_id(self, token: str) -> int | None:
        """The id `token` already has in the vocabulary, or None (SentencePiece answers unk for unknown pieces)."""
        existing, unk = self.processor.piece_to_id(token), self.processor.unk_id()
        return existing if existing != unk or token == self.processor.id_to_piece(unk) else None

    @property
    def vocab_size(self) -> int:
        """The SentencePiece model's pieces plus the special tokens."""
        return self.processor.vocab_size() + len(self.special_tokens)

    @property
    def base_vocab_size(self) -> int:
        """The ids the tokenizer's own files define, before the `special_tokens` added here."""
        return self.processor.vocab_size()

    @property
    def added_tokens(self) -> dict[str, int]:
        """Tokens that text containing them always encodes as one id (text -> id): here the special tokens."""
        return dict(self.special_ids)

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
        return self._finish(ids, bos, eos, max_length, device)

    def _finish(self, ids: list[int], bos: bool, eos: bool, max_length: int | None, device: torch.device | str | None) -> torch.Tensor:
        """BOS/EOS added as asked, cut to max_length, as a LongTensor (T,)."""
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        if max_length is not None:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def decode(self, ids: torch.Tensor | list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`. SentencePiece writes nothing for BOS/EOS; the special tokens are
        written as their strings, or left out with skip_special_tokens=True."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not self.special_tokens:
            return self.processor.decode(ids)
        base = self.processor.vocab_size()
        if skip_special_tokens:
            return self.processor.decode([i for i in ids if not base <= i < base + len(self.special_tokens)])
        # Runs of ordinary ids decode together (SentencePiece joins their pieces); special ids in between.
        text, run = [], []
        for i in ids:
            if base <= i < base + len(self.special_tokens):
                text += [self.processor.decode(run), self.special_tokens[i - base]]
                run = []
            else:
                run.append(i)
        return "".join(text + [self.processor.decode(run)])

    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: Path | str, tokenizer_path: Path | str | None = None, special_tokens: Sequence[str] = (),
    ) -> Tokenizer:
        """The tokenizer of a checkpoint directory, plus the special tokens a merged adapter left in
        special_tokens.json (scripts/merge_lora.py), if any, else `special_tokens` (those an adapter adds).

        The folder's tokenizer.model (SentencePiece) wins when it has one, so that a folder keeps the
        tokenizer its data was prepared with; else its tokenizer.json (Hugging Face, `HFTokenizer`,
        with the folder's tokenizer_config.json, generation_config.json, ...). `tokenizer_path`
        overrides the choice: a .json file is read as tokenizer.json (its own folder's config files
        beside it), anything else as a SentencePiece model.
        """
        checkpoint_dir = Path(checkpoint_dir)
        extra = checkpoint_dir / SPECIAL_TOKENS_NAME
        special = read_special_tokens(extra) if extra.is_file() else list(special_tokens)
        if tokenizer_path is not None:
            tokenizer_path = Path(tokenizer_path)
            if tokenizer_path.suffix == ".json":
                return HFTokenizer(tokenizer_path, special)
            return Tokenizer(tokenizer_path, special)
        if (checkpoint_dir / TOKENIZER_NAME).is_file():
            return Tokenizer(checkpoint_dir / TOKENIZER_NAME, special)
        if (checkpoint_dir / HF_TOKENIZER_NAME).is_file():
            return HFTokenizer(checkpoint_dir / HF_TOKENIZER_NAME, special)
        raise FileNotFoundError(f"no tokenizer in {str(checkpoint_dir)!r}: looked for {TOKENIZER_NAME} (SentencePiece) "
                                f"and {HF_TOKENIZER_NAME} (Hugging Face); pass --tokenizer_path or copy one there")

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
        )
        Path(f"{prefix}.vocab").unlink(missing_ok=True)
        os.replace(f"{prefix}.model", destination)
        return destination


def _read_json(path: Path) -> dict:
    return read_json(path, remedy="fix or remove it") if path.is_file() else {}


def read_special_tokens(path: Path) -> list[str]:
    """special_tokens.json: a list of token strings (scripts/merge_lora.py writes it)."""
    tokens = read_json(path, expect=list, remedy="merge the adapter again or remove the file")
    if not all(isinstance(t, str) and t for t in tokens):
        raise ValueError(f"{str(path)!r} must list the special tokens as non-empty strings; merge the adapter again or remove the file")
    return tokens


def _token_content(token: object) -> str | None:
    """A tokenizer_config.json token entry: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _ids(value: object) -> list[int]:
    """config.json / generation_config.json token ids: an int, a list of ints, or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, read with the `tokenizers` library (the format's own reader),
    with the special tokens its checkpoint's files name.

    `path` is a tokenizer.json file or a folder holding one; the other files are read from the same
    folder when present:
    - tokenizer_config.json (else special_tokens_map.json): bos_token, eos_token, pad_token (strings,
      looked up in the vocabulary), added_tokens_decoder (tokens the tokenizer.json lacks are added
      at the ids it gives), chat_template (else chat_template.jinja);
    - generation_config.json and config.json: bos_token_id and eos_token_id (an int or a list); used
      for BOS/EOS when tokenizer_config.json names none, and for stop_ids.

    BOS rule: `add_bos` says whether the model's own tokenizer puts BOS in front of the text, i.e.
    whether tokenizer.json's post-processor adds `bos_id` first when encoding with special tokens
    (Llama 3's current files add <|begin_of_text|>; SmolLM2 adds nothing). That is what `tokenizers`
    and `transformers.AutoTokenizer` (>= 5, which ignores add_bos_token for a tokenizer.json) do with
    add_special_tokens=True. Pass `add_bos` to override it. `encode(text, bos=True)` prepends BOS only
    when add_bos is True, so bos=True means "the model's own framing" and bos=False "no BOS";
    `eos=True` always appends `eos_id`. Other tokens a post-processor might add are not reproduced.

    Text is split at added tokens as `tokenizers` does by default (and AutoTokenizer with
    split_special_tokens=False): "<|eot_id|>" typed in the text becomes that token's id.

    `eos_id` is the eos_token of tokenizer_config.json (else the first eos_token_id of
    generation_config.json, then config.json); `stop_ids` is every EOS id the files name, eos_id
    first (Llama 3 instruct: <|eot_id|> and <|end_of_text|>). `pad_id` is pad_token (else config's
    pad_token_id, else eos_id: padded positions are always masked). `chat_template` is the raw Jinja
    string, or None.

    `special_tokens` are added after the vocabulary, as in `Tokenizer`.
    """

    def __init__(self, path: Path | str, special_tokens: Sequence[str] = (), add_bos: bool | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / HF_TOKENIZER_NAME
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist; pass a Hugging Face tokenizer.json")
        try:
            self.backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"{str(path)!r} is not a tokenizer.json the tokenizers library can read: {e}") from None
        self.path = path
        folder = path.parent
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")
        model_config = _read_json(folder / "config.json")
        self._add_config_tokens(config.get("added_tokens_decoder") or {}, folder / "tokenizer_config.json")

        def token_id(key: str) -> int | None:
            content = _token_content(config.get(key)) or _token_content(special_map.get(key))
            if content is None:
                return None
            found = self.backend.token_to_id(content)
            if found is None:
                raise ValueError(f"{key} {content!r} of {str(folder)!r} is not in {str(path)!r}; the files do not belong together")
            return found

        def first(key: str) -> int | None:  # generation_config.json first, as transformers' generate reads it
            return next(iter(_ids(generation.get(key)) + _ids(model_config.get(key))), None)

        bos_id = token_id("bos_token")
        self.bos_id = bos_id if bos_id is not None else first("bos_token_id")
        eos_id = token_id("eos_token")
        eos_id = eos_id if eos_id is not None else first("eos_token_id")
        if eos_id is None:
            raise ValueError(f"no EOS token in {str(folder)!r}: none of tokenizer_config.json, special_tokens_map.json, "
                             "generation_config.json, config.json names one")
        self.eos_id = eos_id
        pad_id = token_id("pad_token")
        if pad_id is None:
            pad_id = first("pad_token_id")
        self.pad_id = pad_id if pad_id is not None else eos_id
        stops = [eos_id] + _ids(generation.get("eos_token_id")) + _ids(model_config.get("eos_token_id"))
        self.stop_ids = tuple(dict.fromkeys(stops))
        self.add_bos = self._post_processor_adds_bos() if add_bos is None else bool(add_bos)
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str) and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None

        self.special_tokens = tuple(special_tokens)
        self._check_special_tokens()
        base = self.backend.get_vocab_size(with_added_tokens=True)
        self.backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in self.special_tokens])
        self.special_ids = {token: self.backend.token_to_id(token) for token in self.special_tokens}
        if list(self.special_ids.values()) != list(range(base, base + len(self.special_tokens))):
            raise ValueError(f"special tokens {list(self.special_tokens)} did not get the ids after the vocabulary "
                             f"({base}, ...) but {list(self.special_ids.values())}")

    def _add_config_tokens(self, added: object, config_path: Path) -> None:
        """Add the tokens of tokenizer_config.json's added_tokens_decoder that tokenizer.json lacks."""
        if not (isinstance(added, dict) and all(k.isdigit() and isinstance(v, dict) for k, v in added.items())):
            raise ValueError(f"added_tokens_decoder in {str(config_path)!r} must map token ids (\"128000\") to token "
                             "objects ({\"content\": ...}); fix or remove the file")
        for key, entry in sorted(added.items(), key=lambda kv: int(kv[0])):
            content, want = _token_content(entry), int(key)
            if content is None:
                continue
            have = self.backend.token_to_id(content)
            if have is None:
                options = {k: bool(entry.get(k, False)) for k in ("single_word", "lstrip", "rstrip")}
                special = bool(entry.get("special", False))
                added_token = tokenizers.AddedToken(content, special=special, normalized=bool(entry.get("normalized", not special)), **options)
                self.backend.add_tokens([added_token])
                have = self.backend.token_to_id(content)
            if have != want:
                raise ValueError(f"added token {content!r} is id {want} in tokenizer_config.json but {have} in tokenizer.json; "
                                 "the files do not belong together")

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        plain = self.backend.encode("a", add_special_tokens=False).ids
        framed = self.backend.encode("a", add_special_tokens=True).ids
        return len(framed) > len(plain) and framed[0] == self.bos_id and framed[1:1 + len(plain)] == plain

    _unit = "token"

    def _existing_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce: the vocabulary, its added tokens and the special tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def base_vocab_size(self) -> int:
        """The ids the checkpoint's files define (vocabulary and added tokens), before the `special_tokens` added here."""
        return self.vocab_size - len(self.special_tokens)

    @property
    def added_tokens(self) -> dict[str, int]:
        """The added tokens (<|eot_id|>, <|im_end|>, ..., and the special tokens) as text -> id: text holding one
        encodes it as that id."""
        return {token.content: i for i, token in self.backend.get_added_tokens_decoder().items()}

    def encode(
        self, text: str, bos: bool = True, eos: bool = False, max_length: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Token ids of `text` as a LongTensor (T,): BOS first if `bos` and the model adds one
        (`add_bos`), EOS last if `eos`, cut to max_length."""
        return self._finish(self.backend.encode(text, add_special_tokens=False).ids, bos and self.add_bos, eos, max_length, device)

    def decode(self, ids: torch.Tensor | list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`, special tokens (BOS/EOS included) written out unless skip_special_tokens,
        as AutoTokenizer.decode does (no clean-up of spaces)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
