"""lit_llama.tokenizer.Tokenizer compared with sentencepiece.SentencePieceProcessor used directly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from sentencepiece import SentencePieceProcessor

from lit_llama.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TEXTS = [
    "",
    "Hello world",
    "I believe the meaning of life is",
    "  two leading spaces, three trailing   ",
    "tabs\tand   runs     of spaces",
    "line one\nline two\n\n\nafter blank lines\n",
    "digits 3.14159, 2024-05-29, 1e10 and 007",
    "unicode: café, naïve, Straße, Ελληνικά, русский, 中文, 日本語, 한국어",
    "emoji 🦙🔥👩‍👩‍👧 and symbols ∑∫√ ™ ©",
    "### Instruction:\nName three colors.\n\n### Response:",
    "\u00a0non-breaking\u200bzero-width",
]


def _tokenizer_files():
    return [pytest.param(DATA / name, id=name) for name in ("llama-tokenizer.model", "tok512.model")]


@pytest.mark.parametrize("path", _tokenizer_files())
def test_encode_decode_match_sentencepiece(path):
    if not path.is_file():
        pytest.skip(f"{path} not found")
    sp = SentencePieceProcessor(model_file=str(path))
    tok = Tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.vocab_size())
    for text in TEXTS:
        expected = sp.encode(text)
        assert tok.encode(text, bos=False, eos=False).tolist() == expected, text
        assert tok.encode(text, bos=True, eos=True).tolist() == [sp.bos_id()] + expected + [sp.eos_id()], text
        assert tok.encode(text, bos=True, max_length=3).tolist() == ([sp.bos_id()] + expected)[:3], text
        assert tok.encode(text).dtype == torch.long
        ids = [sp.bos_id()] + expected + [sp.eos_id()]
        assert tok.decode(torch.tensor(ids)) == sp.decode(ids), text
        assert tok.decode(ids) == sp.decode(ids), text


def test_llama_tokenizer_known_ids():
    """Published ids of Meta's tokenizer (see shared/data/README.md)."""
    path = DATA / "llama-tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    tok = Tokenizer(path)
    assert tok.encode("Hello world", bos=False).tolist() == [15043, 3186]
    assert tok.encode("I believe the meaning of life is").tolist() == [1, 306, 4658, 278, 6593, 310, 2834, 338]
    # identity normalizer, byte fallback, no whitespace folding: every text round-trips exactly
    for text in TEXTS:
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_missing_model_file_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")


def test_train_round_trip_and_llama_like_settings(tmp_path):
    """Train a tiny model on generated text; check the SentencePiece settings and exact round trips."""
    rng = random.Random(0)
    words = ["the", "llama", "eats", "green", "grass", "while", "a", "small", "bird", "sings", "over", "hills",
             "river", "stone", "quickly", "and", "then", "sleeps", "under", "stars"]
    lines = []
    for _ in range(3000):
        n = rng.randint(3, 12)
        line = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 99999)}"
        lines.append(line.capitalize() + rng.choice([".", "!", "?", ","]))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")

    path = Tokenizer.train(corpus, tmp_path / "tok", vocab_size=320)
    assert path == tmp_path / "tok" / "tokenizer.model" and path.is_file()
    sp = SentencePieceProcessor(model_file=str(path))
    assert sp.vocab_size() == 320
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in (3, 13, 258)] == ["<0x00>", "<0x0A>", "<0xFF>"]  # byte fallback
    # split_digits: a number is one token per digit
    digit_pieces = [p for p in sp.encode("12345", out_type=str) if p != "▁"]
    assert [p.lstrip("▁") for p in digit_pieces] == list("12345")

    tok = Tokenizer(path)
    unseen = [
        "The llama sings 12345 times.",
        "  spaces   kept\tand\nnewlines\n\n",
        "unseen characters: ß, 中文, 🦙 go through byte fallback",
        "",
    ]
    for text in unseen:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids.tolist() == [1] + sp.encode(text) + [2]
        assert tok.decode(ids) == text


SPECIAL = ("<|user|>", "<|assistant|>", "<|user|>!")  # the last one starts like the first: longest wins


@pytest.mark.parametrize("path", _tokenizer_files())
def test_special_tokens_take_the_next_ids_and_the_text_between_encodes_as_sentencepiece_does(path):
    if not path.is_file():
        pytest.skip(f"{path} not found")
    sp = SentencePieceProcessor(model_file=str(path))
    tok = Tokenizer(path, SPECIAL)
    n = sp.vocab_size()
    assert tok.vocab_size == n + 3 and tok.special_ids == {"<|user|>": n, "<|assistant|>": n + 1, "<|user|>!": n + 2}
    text = "<|user|>Name three colors.<|assistant|> Red, green<|user|>!and blue<|user|>"
    expected = [n, *sp.encode("Name three colors."), n + 1, *sp.encode(" Red, green"), n + 2, *sp.encode("and blue"), n]
    assert tok.encode(text, bos=True, eos=True).tolist() == [sp.bos_id(), *expected, sp.eos_id()]
    # Decoding joins what SentencePiece decodes of each stretch (LLaMA's model gives the text back exactly;
    # tok512 drops the leading space of " Red", as sp.decode(sp.encode(" Red")) does).
    segments = ["Name three colors.", " Red, green", "and blue"]
    decoded = [sp.decode(sp.encode(seg)) for seg in segments]
    assert tok.decode(expected) == f"<|user|>{decoded[0]}<|assistant|>{decoded[1]}<|user|>!{decoded[2]}<|user|>"
    if path.name == "llama-tokenizer.model":
        assert tok.decode(expected) == text
    assert tok.decode(sp.encode("café 🦙")) == sp.decode(sp.encode("café 🦙"))  # no special id: SentencePiece alone
    for text in TEXTS:  # text without a special token encodes exactly as before
        assert tok.encode(text, bos=False).tolist() == sp.encode(text), text


@pytest.mark.parametrize("bad, message", [
    (("<|a|>", "<|a|>"), "repeat"),
    (("",), "empty"),
    (("</s>",), "already piece 2"),
])
def test_bad_special_tokens_are_one_line_errors(bad, message):
    path = DATA / "tok512.model"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with pytest.raises(ValueError, match=message):
        Tokenizer(path, bad)
