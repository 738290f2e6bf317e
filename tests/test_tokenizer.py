"""lit_llama.tokenizer.Tokenizer compared with sentencepiece.SentencePieceProcessor used directly, and
HFTokenizer compared with the `tokenizers` library and transformers.AutoTokenizer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import tokenizers
import torch
from sentencepiece import SentencePieceProcessor

from lit_llama.tokenizer import HFTokenizer, Tokenizer

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


# ---------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (HFTokenizer), compared with `tokenizers` and transformers.AutoTokenizer
# loaded from the same folder.

HF_TEXTS = TEXTS + [
    "digit runs 1234567890123456 and 12 345 6789",
    "whitespace  runs   \t\t tabs\r\nCRLF\n\n\n    indented\n\t\tend   ",
    "CJK 我爱自然语言处理。日本語のテキスト、한국어 문장",
    "emoji 😀🦙🏳️‍🌈 👍🏽 and ZWJ 👨‍💻",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\n",
    "<|eot_id|> typed in the text, <|begin_of_text|>Hi<|end_of_text|>",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|not_a_token|> <eot_id> < |eot_id| >",
    " leading space",
    "\n",
]

# Meta-Llama-3-8B-Instruct's published generation_config.json (the eos list that added <|eot_id|>).
LLAMA3_INSTRUCT_GENERATION_CONFIG = {
    "bos_token_id": 128000, "eos_token_id": [128001, 128009], "do_sample": True, "temperature": 0.6,
    "max_length": 4096, "top_p": 0.9, "transformers_version": "4.40.0.dev0",
}
# The post-processor of the Llama 3 tokenizer.json as meta-llama's repos ship it now (prepends <|begin_of_text|>);
# the copy in shared/data predates it and adds nothing.
LLAMA3_BOS_TEMPLATE = {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
             {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}},
}


def _need(*names):
    for name in names:
        if not (DATA / name).is_file():
            pytest.skip(f"{DATA / name} not found")


@pytest.fixture(scope="module")
def llama3_dir(llama3_chat_dir, tmp_path_factory):
    """conftest's Llama 3 folder plus the instruct model's generation_config.json (its two stop ids)."""
    folder = tmp_path_factory.mktemp("llama3") / "tokenizer"
    shutil.copytree(llama3_chat_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps(LLAMA3_INSTRUCT_GENERATION_CONFIG))
    return folder


@pytest.fixture(scope="module")
def llama3_bos_dir(llama3_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3_bos")
    spec = json.loads((llama3_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = {"type": "Sequence", "processors": [spec["post_processor"], LLAMA3_BOS_TEMPLATE]}
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(llama3_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_chat_dir):
    """SmolLM2-135M-Instruct's tokenizer, turned into tokenizer.json by transformers' GGUF conversion (conftest)."""
    return smollm2_chat_dir


HF_DIRS = ["llama3_dir", "llama3_bos_dir", "smollm2_dir"]


def _references(folder):
    transformers = pytest.importorskip("transformers")
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", HF_DIRS)
def test_hf_encode_decode_match_tokenizers_and_auto_tokenizer(name, request):
    folder = request.getfixturevalue(name)
    tok = Tokenizer.from_checkpoint(folder)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    reference, auto = _references(folder)
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True) == len(auto)
    assert (tok.bos_id, tok.eos_id) == (auto.bos_token_id, auto.eos_token_id)
    assert tok.pad_id == (auto.pad_token_id if auto.pad_token_id is not None else auto.eos_token_id)
    assert tok.chat_template == auto.chat_template and tok.chat_template  # both models ship one
    for text in HF_TEXTS:
        plain = reference.encode(text, add_special_tokens=False).ids
        assert plain == auto.encode(text, add_special_tokens=False), text  # the two references agree
        assert tok.encode(text, bos=False).tolist() == plain, text
        # bos=True: exactly what the model's tokenizer adds with add_special_tokens=True
        assert tok.encode(text, bos=True).tolist() == auto(text, add_special_tokens=True)["input_ids"], text
        assert tok.encode(text, bos=True).tolist() == reference.encode(text, add_special_tokens=True).ids, text
        assert tok.encode(text, bos=False, eos=True).tolist() == plain + [auto.eos_token_id], text
        assert tok.encode(text, bos=False, max_length=2).tolist() == plain[:2], text
        assert tok.encode(text).dtype == torch.long
        ids = tok.encode(text, bos=True, eos=True).tolist()
        for skip in (False, True):
            expected = auto.decode(ids, skip_special_tokens=skip)
            assert expected == reference.decode(ids, skip_special_tokens=skip), text
            assert tok.decode(ids, skip_special_tokens=skip) == expected, text
            assert tok.decode(torch.tensor(ids), skip_special_tokens=skip) == expected, text
        assert tok.decode(ids) == auto.decode(ids), text  # the same default: special tokens written out
        assert tok.decode(tok.encode(text, bos=False)) == text  # byte-level BPE round-trips exactly


def test_text_that_looks_like_a_special_token_encodes_as_that_token(llama3_dir, smollm2_dir):
    """As AutoTokenizer does by default (split_special_tokens=False)."""
    llama3, smol = Tokenizer.from_checkpoint(llama3_dir), Tokenizer.from_checkpoint(smollm2_dir)
    assert llama3.encode("<|eot_id|>", bos=False).tolist() == [128009]
    assert llama3.encode("Hi<|eot_id|>", bos=False).tolist()[-1] == 128009
    _, auto = _references(smollm2_dir)
    im_end = auto.convert_tokens_to_ids("<|im_end|>")
    assert smol.encode("<|im_end|>", bos=False).tolist() == [im_end]


def test_bos_follows_the_model(llama3_dir, llama3_bos_dir, smollm2_dir):
    """add_bos from the files: the shipped-here Llama 3 file adds none, the current one adds <|begin_of_text|>,
    SmolLM2 none (its bos_token <|im_start|> is not put in front of text)."""
    assert Tokenizer.from_checkpoint(llama3_dir).add_bos is False
    bos = Tokenizer.from_checkpoint(llama3_bos_dir)
    assert bos.add_bos is True and bos.encode("Hello world").tolist() == [128000, 9906, 1917]
    assert bos.encode("Hello world", bos=False).tolist() == [9906, 1917]
    smol = Tokenizer.from_checkpoint(smollm2_dir)
    assert smol.add_bos is False and smol.encode("Hello").tolist() == smol.encode("Hello", bos=False).tolist()
    assert HFTokenizer(smollm2_dir, add_bos=True).encode("Hi").tolist()[0] == smol.bos_id  # explicit override


def test_stop_ids_come_from_the_files(llama3_dir, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    llama3 = Tokenizer.from_checkpoint(llama3_dir)
    assert {128009, 128001} <= set(llama3.stop_ids) and llama3.stop_ids[0] == llama3.eos_id
    generation = transformers.GenerationConfig.from_pretrained(llama3_dir)
    assert set(generation.eos_token_id) <= set(llama3.stop_ids)
    assert [llama3.decode([i]) for i in (128001, 128009)] == ["<|end_of_text|>", "<|eot_id|>"]
    # without generation_config.json only the tokenizer's own eos_token is known
    folder = llama3_dir.parent / "llama3_no_generation"
    folder.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llama3_dir / name, folder / name)
    assert Tokenizer.from_checkpoint(folder).stop_ids == (128001,)
    # config.json's eos_token_id (an int here) joins them
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 128009, "bos_token_id": 128000}))
    assert Tokenizer.from_checkpoint(folder).stop_ids == (128001, 128009)

    smol = Tokenizer.from_checkpoint(smollm2_dir)
    _, auto = _references(smollm2_dir)
    assert auto.convert_tokens_to_ids("<|im_end|>") in smol.stop_ids
    assert smol.decode(list(smol.stop_ids)) == "<|im_end|>"


def test_added_tokens_decoder_tokens_missing_from_tokenizer_json_are_added(smollm2_dir, tmp_path):
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copyfile(smollm2_dir / name, tmp_path / name)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"49152": {"content": "<|tool|>", "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_checkpoint(tmp_path)
    _, auto = _references(tmp_path)
    text = "call<|tool|>now"
    assert tok.encode(text, bos=False).tolist() == auto.encode(text, add_special_tokens=False)
    assert tok.encode("<|tool|>", bos=False).tolist() == [49152] and tok.vocab_size == len(auto) == 49153
    config["added_tokens_decoder"] = {"7": {"content": "<|im_end|>", "special": True}}  # is id 2 in tokenizer.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not belong together"):
        Tokenizer.from_checkpoint(tmp_path)


def test_hf_special_tokens_take_the_next_ids(smollm2_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_dir / name, tmp_path / name)
    (tmp_path / "special_tokens.json").write_text(json.dumps(["<|user|>", "<|assistant|>"]))
    tok = Tokenizer.from_checkpoint(tmp_path)
    plain = HFTokenizer(smollm2_dir)
    n = plain.vocab_size
    assert tok.vocab_size == n + 2 and tok.special_ids == {"<|user|>": n, "<|assistant|>": n + 1}
    ids = tok.encode("<|user|>Hi<|assistant|>", bos=False).tolist()
    assert ids == [n, *plain.encode("Hi", bos=False).tolist(), n + 1]
    assert tok.decode(ids) == "<|user|>Hi<|assistant|>" and tok.decode(ids, skip_special_tokens=True) == "Hi"
    with pytest.raises(ValueError, match="already token 2"):
        HFTokenizer(smollm2_dir, ["<|im_end|>"])


def test_from_checkpoint_picks_the_backend_the_folder_holds(llama3_dir, tmp_path):
    _need("tok512.model")
    shutil.copyfile(DATA / "tok512.model", tmp_path / "tokenizer.model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llama3_dir / name, tmp_path / name)
    both = Tokenizer.from_checkpoint(tmp_path)  # tokenizer.model wins: the tokenizer data was prepared with
    assert type(both) is Tokenizer and both.vocab_size == 512 and both.stop_ids == (2,) and both.chat_template is None
    forced = Tokenizer.from_checkpoint(tmp_path, tmp_path / "tokenizer.json")
    assert type(forced) is HFTokenizer and forced.vocab_size == 128256
    assert type(Tokenizer.from_checkpoint(llama3_dir)) is HFTokenizer


def test_a_folder_without_a_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer.from_checkpoint(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "tokenizer.model" in message and "tokenizer.json" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTokenizer(tmp_path)


def test_convert_hf_checkpoint_copies_the_hf_tokenizer_files(llama3_dir, tmp_path, capsys):
    """A converted Llama 3 folder (tokenizer.json, no tokenizer.model) keeps its tokenizer and stop ids."""
    import importlib.util
    import sys

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(llama3_dir / name, tmp_path / "hf" / name)
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_hf_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_hf_checkpoint", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["convert_hf_checkpoint"] = module
    spec.loader.exec_module(module)
    module.main(checkpoint_dir=tmp_path / "hf", output_dir=tmp_path / "lit")
    assert "note: no" not in capsys.readouterr().err
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "lit" / name).read_bytes() == (llama3_dir / name).read_bytes(), name
    assert not (tmp_path / "lit" / "tokenizer.model").exists()
    tok = Tokenizer.from_checkpoint(tmp_path / "lit")
    assert type(tok) is HFTokenizer and {128001, 128009} <= set(tok.stop_ids) and tok.chat_template


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_tokenizer_model_is_one_clear_error(tmp_path, damage):
    """sentencepiece's own RuntimeError ("could not parse ModelProto", "unk is not defined") becomes a
    ValueError that says what to do, so the scripts print one line instead of a traceback."""
    source = DATA / "tok512.model"
    if not source.is_file():
        pytest.skip(f"{source} not found")
    broken = tmp_path / "tokenizer.model"
    broken.write_bytes(source.read_bytes()[:1000] if damage == "truncated" else b"")
    with pytest.raises(ValueError, match="is not a SentencePiece model sentencepiece can read.*copy it again"):
        Tokenizer(broken)
