"""The tokenizer of a Hugging Face export (lit_llama/hf_tokenizer_export.py) against the references:
`transformers.AutoTokenizer` on the exported folder (no protobuf) must encode as `sentencepiece`
does with BOS first and decode as it does, on the real LLaMA and tok512 models; a converted random
model must generate in transformers what it generates here."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

from lit_llama.checkpoint import save_checkpoint
from lit_llama.generation import generate
from lit_llama.hf_tokenizer_export import sentencepiece_settings, write_hf_tokenizer
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.tokenizer import HF_TOKENIZER_NAME, SPECIAL_TOKENS_NAME, Tokenizer

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MODELS = ["llama-tokenizer.model", "tok512.model"]

TEXTS = [
    "", " ", "   ", "Hello world", " Hello", "Hello ", "  two  spaces  ", "\tTab\tand\nnewline\n\n", "\r\n windows",
    "héllo wörld ñ ç Ångström", "日本語のテキスト 中文 한국어", "emoji 🙂🚀 👩‍👩‍👧 family", "1234567890 3.14159 007",
    "def f(x):\n    return x ** 2  # code\n\tpass", "<s> typed </s> and <unk> and <0x41>", "ok<s>x</s>",
    "\u2581already\u2581escaped", "\x00\x01 control \x7f", "ǅ ﬁ ﬀ Ⅻ ℌ", "a" * 50, "   leading", "trailing   ",
    "mixed \t \n  spaces", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010FFFF \u200b zero width", "Once upon a time, there was a little girl.",
]


def convert_lit_checkpoint():
    spec = importlib.util.spec_from_file_location("convert_lit_checkpoint", REPO / "scripts" / "convert_lit_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main


def model_path(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def checkpoint_with(tmp_path: Path, name: str, special_tokens: list[str] | None = None) -> Path:
    checkpoint = tmp_path / "lit"
    checkpoint.mkdir()
    shutil.copyfile(model_path(name), checkpoint / "tokenizer.model")
    if special_tokens:
        (checkpoint / SPECIAL_TOKENS_NAME).write_text(json.dumps(special_tokens))
    return checkpoint


@pytest.mark.parametrize("name", MODELS)
def test_exported_tokenizer_encodes_and_decodes_as_sentencepiece(name, tmp_path):
    checkpoint = checkpoint_with(tmp_path, name)
    write_hf_tokenizer(checkpoint, tmp_path / "hf", LLaMAConfig.from_name("tiny"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = SentencePieceProcessor(model_file=str(model_path(name)))
    ours = Tokenizer.from_checkpoint(checkpoint)
    for text in TEXTS:
        expected = [sp.bos_id()] + sp.encode(text)
        assert hf(text).input_ids == expected, text
        assert ours.encode(text, bos=True).tolist() == expected, text
        assert hf.decode(expected[1:]) == sp.decode(expected[1:]), text
        assert hf.decode(expected, skip_special_tokens=True) == sp.decode(expected), text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0)
    assert hf.unk_token_id == sp.unk_id() and len(hf) == sp.vocab_size()
    assert hf.model_max_length == 128  # the tiny config's block_size
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


@pytest.mark.parametrize("name", MODELS)
def test_exported_tokenizer_decodes_id_sequences_as_sentencepiece(name, tmp_path):
    """Arbitrary sequences (what a model generates): pieces, runs of "▁", BOS/EOS (skipped), and byte
    pieces forming valid UTF-8. Invalid UTF-8 from byte pieces differs: tokenizers' ByteFallback writes
    one U+FFFD per byte of the whole run, SentencePiece keeps the valid bytes (documented)."""
    write_hf_tokenizer(checkpoint_with(tmp_path, name), tmp_path / "hf", LLaMAConfig.from_name("tiny"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = SentencePieceProcessor(model_file=str(model_path(name)))
    pieces = [i for i in range(sp.vocab_size()) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    space = sp.piece_to_id("\u2581")
    byte_runs = [[sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode()] for ch in "\n\t é€🙂\x00A"]
    rng = random.Random(0)
    for _ in range(500):
        ids = []
        for _ in range(rng.randint(0, 10)):
            kind = rng.random()
            ids += ([rng.choice(pieces)] if kind < 0.5 else [space] if kind < 0.7 else
                    [rng.choice((sp.bos_id(), sp.eos_id()))] if kind < 0.8 else rng.choice(byte_runs))
        assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids), [sp.id_to_piece(i) for i in ids]


def test_normalizer_settings_read_without_protobuf():
    llama = sentencepiece_settings(SentencePieceProcessor(model_file=str(model_path("llama-tokenizer.model"))).serialized_model_proto())
    tok512 = sentencepiece_settings(SentencePieceProcessor(model_file=str(model_path("tok512.model"))).serialized_model_proto())
    for settings, remove in ((llama, 0), (tok512, 1)):
        assert (settings["model_type"], settings["byte_fallback"], settings["name"]) == ("bpe", 1, "identity")
        assert (settings["add_dummy_prefix"], settings["remove_extra_whitespaces"], settings["escape_whitespaces"]) == (1, remove, 1)
        assert settings["precompiled_charsmap"] == b"" and settings["user_defined"] == settings["unused"] == 0


def test_special_tokens_become_added_tokens_at_their_ids(tmp_path):
    special = ["<|user|>", "<|assistant|>"]
    checkpoint = checkpoint_with(tmp_path, "llama-tokenizer.model", special)
    write_hf_tokenizer(checkpoint, tmp_path / "hf", LLaMAConfig.from_name("tiny"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer.from_checkpoint(checkpoint)
    assert [hf.convert_tokens_to_ids(t) for t in special] == [32000, 32001] == [ours.special_ids[t] for t in special]
    assert len(hf) == ours.vocab_size == 32002
    for text in ("<|user|>Hi there<|assistant|> Hello!", "a<|user|><|assistant|>b <s>", " <|user|> x "):
        assert hf(text).input_ids == ours.encode(text, bos=True).tolist(), text
        ids = ours.encode(text, bos=False).tolist()
        assert hf.decode(ids) == ours.decode(ids), text


def test_hugging_face_tokenizer_files_are_copied_unchanged(tmp_path):
    checkpoint = tmp_path / "lit"
    checkpoint.mkdir()
    files = {HF_TOKENIZER_NAME: DATA / "llama3-tokenizer.json", "tokenizer_config.json": DATA / "llama3-tokenizer_config.json"}
    for target, source in files.items():
        if not source.is_file():
            pytest.skip(f"{source} is absent")
        shutil.copyfile(source, checkpoint / target)
    ids = write_hf_tokenizer(checkpoint, tmp_path / "hf", LLaMAConfig.from_name("tiny"))
    for target, source in files.items():
        assert (tmp_path / "hf" / target).read_bytes() == source.read_bytes(), target
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (ids["bos_token_id"], ids["eos_token_id"]) == (hf.bos_token_id, hf.eos_token_id)


def test_bad_tokenizer_model_is_one_line_value_error(tmp_path):
    (tmp_path / "lit").mkdir()
    (tmp_path / "lit" / "tokenizer.model").write_bytes(b"not a SentencePiece model")
    with pytest.raises(ValueError, match="is not a SentencePiece model") as error:
        write_hf_tokenizer(tmp_path / "lit", tmp_path / "hf", LLaMAConfig.from_name("tiny"))
    assert "\n" not in str(error.value)


def test_exported_checkpoint_generates_in_transformers_as_here(tmp_path):
    """A random LLaMA with the LLaMA tokenizer, exported by convert_lit_checkpoint.py: transformers'
    tokenizer + greedy generate of 64 tokens equal ours token for token (fp32, so no near-tie flips)."""
    config = LLaMAConfig(block_size=128, vocab_size=32000, padded_vocab_size=32000, n_layer=2, n_head=4, n_embd=32,
                         intermediate_size=64)
    torch.manual_seed(0)
    model = LLaMA(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)  # large enough that the logits vary and greedy decoding does not loop at once
    save_checkpoint(model, tmp_path / "lit", tokenizer_path=model_path("llama-tokenizer.model"))
    convert_lit_checkpoint()(checkpoint_dir=tmp_path / "lit", output_dir=tmp_path / "hf")

    ours = Tokenizer.from_checkpoint(tmp_path / "lit")
    prompt = "Once upon a time, in a land far away,"
    idx = ours.encode(prompt, bos=True)
    expected = generate(model, idx, max_new_tokens=64, temperature=0, stop_ids=ours.eos_id, pad_id=ours.pad_id)[0]

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    inputs = hf_tokenizer(prompt, return_tensors="pt")
    assert inputs.input_ids[0].tolist() == idx.tolist()
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=64, do_sample=False)[0]
    # transformers keeps the EOS it stopped at; ours stops before it.
    got = out[: len(expected)]
    assert got.tolist() == expected.tolist()
    assert len(expected) == len(idx) + 64 or out[len(expected)] == ours.eos_id
    assert len(set(expected[len(idx):].tolist())) > 8  # not degenerate
    new = expected[len(idx):].tolist()
    assert hf_tokenizer.decode(new) == ours.decode(new)


def test_chat_template_beside_tokenizer_model_is_carried_over(tmp_path):
    checkpoint = checkpoint_with(tmp_path, "tok512.model")
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    write_hf_tokenizer(checkpoint, tmp_path / "hf", LLaMAConfig.from_name("tiny"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.chat_template == template
    text = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "user: Hi\n"


def test_hugging_face_tokenizer_with_special_tokens_gets_them_added(tmp_path):
    checkpoint = tmp_path / "lit"
    checkpoint.mkdir()
    for target, source in ((HF_TOKENIZER_NAME, "llama3-tokenizer.json"), ("tokenizer_config.json", "llama3-tokenizer_config.json")):
        if not (DATA / source).is_file():
            pytest.skip(f"{DATA / source} is absent")
        shutil.copyfile(DATA / source, checkpoint / target)
    (checkpoint / SPECIAL_TOKENS_NAME).write_text(json.dumps(["<|mine|>"]))
    write_hf_tokenizer(checkpoint, tmp_path / "hf", LLaMAConfig.from_name("tiny"))
    ours = Tokenizer.from_checkpoint(checkpoint)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.convert_tokens_to_ids("<|mine|>") == ours.special_ids["<|mine|>"] == 128256
    text = "Hello<|mine|> world"
    assert hf(text, add_special_tokens=False).input_ids == ours.encode(text, bos=False).tolist()


def test_model_it_cannot_reproduce_is_refused_in_one_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    (tmp_path / "lit").mkdir()
    SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "lit" / "tokenizer"), vocab_size=40,
                               model_type="unigram", minloglevel=2, num_threads=1)
    with pytest.raises(ValueError, match="a unigram model .*no byte fallback") as error:
        write_hf_tokenizer(tmp_path / "lit", tmp_path / "hf", LLaMAConfig.from_name("tiny"))
    assert "\n" not in str(error.value)
