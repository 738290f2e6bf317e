"""The tokenizer files of a Hugging Face export (scripts/convert_lit_checkpoint.py), so that
`transformers.AutoTokenizer.from_pretrained(folder)` tokenizes as lit_llama does, without protobuf.

A checkpoint with a SentencePiece `tokenizer.model` (what `Tokenizer.from_checkpoint` reads first):
the model becomes a fast-tokenizer `tokenizer.json`, built with the `tokenizers` library the way
transformers' LlamaConverter builds one (byte-fallback BPE; merges are every pair of normal pieces
whose concatenation is a normal piece, ranked by that piece's score; the normalizer prepends the
dummy "▁" and turns spaces into "▁"; the decoder undoes both). The pieces, scores and types are read
through `SentencePieceProcessor`; the normalizer and trainer settings, which it does not expose, are
read from the model's serialized protobuf with the few lines of wire-format reading below (the
protobuf package is not needed). Settings it cannot reproduce exactly are refused with one line:
a Unigram model, user-defined or unused pieces, a normalization rule other than identity (a
precompiled charsmap), whitespace as suffix, no whitespace escaping, a denormalizer.
remove_extra_whitespaces (llama2.c's tok512) is reproduced: leading and trailing spaces dropped,
runs of spaces cut to one (SentencePiece counts only " " as whitespace here).

Beside it: tokenizer_config.json (bos/eos/unk/pad tokens as ours, add_bos_token true, add_eos_token
false, model_max_length = block_size, split_special_tokens true, chat_template when the checkpoint
has one), special_tokens_map.json and generation_config.json (bos/eos/pad ids). BOS, EOS and unk
are special tokens, but text that spells them ("<s>") is encoded as text, as SentencePiece does:
hence split_special_tokens. The special tokens of a merged adapter (special_tokens.json) are added
tokens at the ids after the vocabulary, split out of the text as `Tokenizer.encode` does; they are
not marked special (that would stop the split), so AutoTokenizer's decode(skip_special_tokens=True)
keeps them where ours drops them.

Known differences, all in decoding ids a model generated (encoding is exact):
- byte pieces that are not valid UTF-8: tokenizers' ByteFallback writes one U+FFFD per byte of the
  whole run of byte pieces, SentencePiece keeps the valid bytes in it;
- byte pieces that spell "▁" decode as a space (SentencePiece has the piece, so it never encodes so);
- the unk id decodes as "<unk>" (or nothing, skip_special_tokens), SentencePiece writes " ⁇ ";
- BOS/EOS are written out unless skip_special_tokens=True; SentencePiece writes nothing for them.
A chat template renders "<s>"/"</s>" as text, and split_special_tokens makes that text again, as
our tokenizer would; pass split_special_tokens=False to AutoTokenizer to get the special ids.

A checkpoint with only a Hugging Face `tokenizer.json` (`HFTokenizer`): its files are copied
unchanged; with special_tokens.json, tokenizer.json is written with those tokens added.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, processors
from tokenizers.models import BPE

from lit_llama.checkpoint import atomic_copy, atomic_write_text
from lit_llama.json_file import read_json
from lit_llama.model import LLaMAConfig
from lit_llama.tokenizer import (
    HF_TOKENIZER_FILES,
    HF_TOKENIZER_NAME,
    TOKENIZER_NAME,
    Tokenizer,
)

SPACE = "▁"  # SentencePiece's escaped space (U+2581)


# --------------------------------------------------------------- SentencePiece settings, no protobuf
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: an int for varints, bytes for the rest."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _varint(buf, i)
        elif wire_type == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire_type == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire_type == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"the SentencePiece model has protobuf wire type {wire_type}, which no model uses; is the file damaged?")
        yield number, value


# Field numbers and defaults of sentencepiece_model.proto (ModelProto, TrainerSpec, NormalizerSpec).
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
_TRAINER = {"model_type": (3, 1), "treat_whitespace_as_suffix": (24, 0), "byte_fallback": (35, 0)}
_NORMALIZER = {"name": (1, b""), "precompiled_charsmap": (2, b""), "add_dummy_prefix": (3, 1),
               "remove_extra_whitespaces": (4, 1), "escape_whitespaces": (5, 1)}
_USER_DEFINED, _UNUSED = 4, 5  # SentencePiece.Type


def sentencepiece_settings(serialized: bytes) -> dict:
    """The trainer and normalizer settings of a serialized SentencePiece ModelProto, with the
    proto's defaults for fields not written, plus the number of user-defined and unused pieces."""
    trainer, normalizer, denormalizer, piece_types = b"", b"", b"", []
    for number, value in proto_fields(serialized):
        if number == 1:  # a piece: (piece, score, type); type NORMAL (1) when not written
            piece_types.append(dict(proto_fields(value)).get(3, 1))
        elif number == 2:
            trainer = value
        elif number == 3:
            normalizer = value
        elif number == 5:
            denormalizer = value
    trainer_fields, normalizer_fields = dict(proto_fields(trainer)), dict(proto_fields(normalizer))
    settings = {key: trainer_fields.get(n, default) for key, (n, default) in _TRAINER.items()}
    settings |= {key: normalizer_fields.get(n, default) for key, (n, default) in _NORMALIZER.items()}
    settings["model_type"] = _MODEL_TYPES.get(settings["model_type"], str(settings["model_type"]))
    settings["name"] = bytes(settings["name"]).decode("utf-8", "replace")
    settings["denormalizer_charsmap"] = dict(proto_fields(denormalizer)).get(2, b"")
    settings["user_defined"] = piece_types.count(_USER_DEFINED)
    settings["unused"] = piece_types.count(_UNUSED)
    return settings


def _check_exact(settings: dict, model_path: Path) -> None:
    """Refuse, in one line, what the tokenizer.json below would not reproduce exactly."""
    problems = {
        "model_type": settings["model_type"] != "bpe" and f"a {settings['model_type']} model (only BPE is converted)",
        "byte_fallback": not settings["byte_fallback"] and "no byte fallback",
        "charsmap": bool(settings["precompiled_charsmap"]) and f"normalization rule {settings['name']!r} (only identity)",
        "denormalizer": bool(settings["denormalizer_charsmap"]) and "a denormalizer",
        "suffix": bool(settings["treat_whitespace_as_suffix"]) and "treat_whitespace_as_suffix",
        "escape": not settings["escape_whitespaces"] and "escape_whitespaces=false",
        "user_defined": settings["user_defined"] and f"{settings['user_defined']} user-defined pieces",
        "unused": settings["unused"] and f"{settings['unused']} unused pieces",
    }
    found = [text for text in problems.values() if text]
    if found:
        raise ValueError(f"{str(model_path)!r} has {', '.join(found)}, which a tokenizer.json cannot reproduce exactly "
                         "here; export without it (remove tokenizer.model from the checkpoint) or convert the tokenizer yourself")


# ------------------------------------------------------------------------ tokenizer.json from .model
def bpe_merges(processor, normal: set[int]) -> list[tuple[str, str]]:
    """Every pair (a, b) of normal pieces with a + b a normal piece, ranked by the score of a + b
    (highest first; ties by its id), as SentencePiece's BPE merges the best-scoring pair first."""
    ids = {processor.id_to_piece(i): i for i in normal}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-processor.get_score(i), i, ids[left], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def sentencepiece_to_tokenizers(tokenizer: Tokenizer, model_path: Path) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` that encodes like `tokenizer.encode(text, bos=True)` and decodes
    like `tokenizer.decode`, with the special tokens as added tokens at their ids."""
    sp = tokenizer.processor
    settings = sentencepiece_settings(sp.serialized_model_proto())
    _check_exact(settings, model_path)
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    control = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    normal = {i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    unk = sp.id_to_piece(sp.unk_id())
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=bpe_merges(sp, normal), unk_token=unk, fuse_unk=True,
                                       byte_fallback=True, dropout=None))
    steps = []
    if settings["remove_extra_whitespaces"]:  # SentencePiece's whitespace here is " " only, not tabs or newlines
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if settings["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(SPACE))  # only to non-empty text, as SentencePiece
    steps.append(normalizers.Replace(" ", SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    # SentencePiece's decode drops the "▁" that the first piece starts with (with remove_extra_whitespaces,
    # every "▁" before the first other character), never a space from a byte piece (<0x20>). So the bytes
    # are decoded and the pieces fused first, and the start of the text is cut before "▁" becomes " "
    # (transformers' Llama decoder strips one space after ByteFallback, a byte's too). The one case this
    # gets wrong: byte pieces spelling "▁" itself, which SentencePiece never produces (it has the piece).
    # `Tokenizer.decode` decodes the runs between special tokens one by one, so the same cut follows each
    # special token (an Oniguruma lookbehind).
    steps = [decoders.ByteFallback(), decoders.Fuse()]
    if settings["add_dummy_prefix"] or settings["remove_extra_whitespaces"]:
        start = "\\A"
        if tokenizer.special_tokens:
            start = f"(?:\\A|(?<={'|'.join(map(re.escape, tokenizer.special_tokens))}))"
        steps.append(decoders.Replace(Regex(start + SPACE + ("+" if settings["remove_extra_whitespaces"] else "")), ""))
    steps.append(decoders.Replace(SPACE, " "))
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokenizer.special_tokens])
    got = [backend.token_to_id(t) for t in tokenizer.special_tokens]
    if got != [tokenizer.special_ids[t] for t in tokenizer.special_tokens]:
        raise ValueError(f"special tokens {list(tokenizer.special_tokens)} got ids {got} in tokenizer.json, not the ids "
                         f"after the vocabulary ({n}, ...)")
    bos = sp.id_to_piece(tokenizer.bos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_id)],
    )
    return backend


def checkpoint_chat_template(checkpoint_dir: Path) -> str | None:
    """A chat template the checkpoint carries beside its tokenizer.model (tokenizer_config.json or
    chat_template.jinja, e.g. from a Hugging Face chat model's folder), else None."""
    config_path = checkpoint_dir / "tokenizer_config.json"
    if config_path.is_file():
        template = read_json(config_path, remedy="fix or remove it").get("chat_template")
        if isinstance(template, str):
            return template
    jinja = checkpoint_dir / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_from_sentencepiece(checkpoint_dir: Path, output_dir: Path, config: LLaMAConfig) -> dict[str, int]:
    model_path = checkpoint_dir / TOKENIZER_NAME
    try:
        tokenizer = Tokenizer.from_checkpoint(checkpoint_dir)
    except RuntimeError as e:  # SentencePiece's error for a file it cannot parse
        raise ValueError(f"{str(model_path)!r} is not a SentencePiece model ({str(e).splitlines()[0]}); "
                         "replace it or remove it from the checkpoint") from None
    backend = sentencepiece_to_tokenizers(tokenizer, model_path)
    atomic_write_text(output_dir / HF_TOKENIZER_NAME, backend.to_str(pretty=True))
    sp = tokenizer.processor
    names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "unk_token": sp.unk_id(), "pad_token": tokenizer.pad_id}
    names = {key: sp.id_to_piece(i) for key, i in names.items()}
    added = {str(i): {"content": sp.id_to_piece(i), "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)}
    added |= {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                       "special": False} for t, i in tokenizer.special_ids.items()}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # the tokenizer.json as written, not LlamaTokenizer's rebuild
        **names,
        "add_bos_token": True,
        "add_eos_token": False,
        "split_special_tokens": True,  # "<s>" typed in the text is text, as in SentencePiece
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.block_size,
        "added_tokens_decoder": added,
    }
    template = checkpoint_chat_template(checkpoint_dir)
    if template is not None:
        tokenizer_config["chat_template"] = template
    _write_json(output_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(output_dir / "special_tokens_map.json", names)
    atomic_copy(model_path, output_dir / TOKENIZER_NAME)  # for tools that read SentencePiece
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def _write_from_hf(checkpoint_dir: Path, output_dir: Path) -> dict[str, int]:
    tokenizer = Tokenizer.from_checkpoint(checkpoint_dir)  # an HFTokenizer, with special_tokens.json's tokens
    for name in HF_TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            atomic_copy(checkpoint_dir / name, output_dir / name)
    if tokenizer.special_tokens:  # a merged adapter's tokens, added after the vocabulary as HFTokenizer does
        atomic_write_text(output_dir / HF_TOKENIZER_NAME, tokenizer.backend.to_str(pretty=True))
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {key: i for key, i in ids.items() if i is not None}


def write_hf_tokenizer(checkpoint_dir: Path | str, output_dir: Path | str, config: LLaMAConfig) -> dict[str, int]:
    """Write the tokenizer files of a Hugging Face export of `checkpoint_dir` into `output_dir`
    (see the module docstring); returns the bos/eos/pad_token_id for config.json, {} when the
    checkpoint has no tokenizer."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if (checkpoint_dir / TOKENIZER_NAME).is_file():
        ids = _write_from_sentencepiece(checkpoint_dir, output_dir, config)
    elif (checkpoint_dir / HF_TOKENIZER_NAME).is_file():
        ids = _write_from_hf(checkpoint_dir, output_dir)
        if (checkpoint_dir / "generation_config.json").is_file():
            return ids  # copied unchanged
    else:
        return {}
    _write_json(output_dir / "generation_config.json", {**ids, "_from_model_config": False})
    return ids
