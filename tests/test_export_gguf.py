"""The GGUF exporter against independent references: transformers' own GGUF loader (its reader,
dequantizer, model and tokenizer builder) for logits and encodings; gguf.GGUFReader for metadata;
the GGUF reader lit_llama/convert_gguf.py for round trips. Tiny random models (MHA and GQA, tied and
untied) with the SentencePiece tok512.model and SmolLM2's tokenizer.json (skipped without ../shared/data).

Measured logits error vs our fp32 model (tiny random model, |logits| ~ 3): f32 2e-6, f16 3e-3,
bf16 3e-2, q8_0 7e-2; the bounds below are those with a margin (f32 1e-5 as promised)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lit_llama.adapter import save_adapter
from lit_llama.checkpoint import save_checkpoint
from lit_llama.cli import run as cli_run
from lit_llama.convert_gguf import convert_gguf, field
from lit_llama.export_gguf import export_checkpoint
from lit_llama.lora import LoRAConfig, build_lora_model, lora_layers
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_data = pytest.mark.skipif(not (DATA / "tok512.model").is_file(), reason=f"{DATA / 'tok512.model'} is absent")
needs_smol = pytest.mark.skipif(not (DATA / SMOL).is_file(), reason=f"{DATA / SMOL} is absent")
pytestmark = pytest.mark.usefixtures("one_thread")

# logits error bounds per outtype, vs our fp32 model (measured, see the module docstring)
BOUNDS = {"f32": 1e-5, "f16": 1e-2, "bf16": 1e-1, "q8_0": 2e-1}
TEXTS = [
    "Hello world", "  leading and   inner   spaces\t\ttabs\n\n\nnewlines  ", "12345 + 678 = 13023, 3.14159",
    "naïve café, Zürich; 日本語; русский", "emoji: 🦙🚀 and 🇫🇷", "def f(x):\n    return x ** 2\n",
    "don't you'll I'M we've", "trailing space ", "<|im_start|>user\nhi<|im_end|>\n",
]
# tok512.model collapses runs of spaces (remove_extra_whitespaces); llama.cpp's and transformers' GGUF
# SentencePiece tokenizers do not, so the SentencePiece comparisons use text without repeated spaces.
SP_TEXTS = [t for t in TEXTS if "  " not in t and t.strip() == t]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]


def script_main(name: str):
    """A script's main, imported as a module."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # jsonargparse resolves the postponed annotations through sys.modules
    spec.loader.exec_module(module)
    return module.main


def tiny_model(vocab: int, gqa: bool, tied: bool, seed: int = 0, **overrides) -> LLaMA:
    config = LLaMAConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=4, n_embd=64, n_query_groups=2 if gqa else 4,
                         intermediate_size=96, tie_embeddings=tied, norm_eps=1e-5, **overrides)
    torch.manual_seed(seed)
    model = LLaMA(config)
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1 too, so a misplaced norm shows
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def checkpoint(tmp_path: Path, model: LLaMA, tokenizer: str | Path) -> Path:
    folder = tmp_path / "lit"
    if tokenizer == "sp":
        save_checkpoint(model, folder, tokenizer_path=DATA / "tok512.model")
    else:
        save_checkpoint(model, folder, tokenizer_dir=tokenizer)
    return folder


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def max_logits_error(ours: LLaMA, path: Path, vocab: int) -> float:
    hf = hf_model(path)
    idx = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(idx) - hf(idx).logits).abs().max().item()


# ---------------------------------------------------------------------------------- the weights
@needs_data
@pytest.mark.parametrize("gqa,tied", [(False, False), (True, True)])
def test_logits_match_transformers_gguf_loader_per_outtype(tmp_path, gqa, tied):
    model = tiny_model(512, gqa, tied)
    folder = checkpoint(tmp_path, model, "sp")
    for outtype, bound in BOUNDS.items():
        path = tmp_path / f"m.{outtype}.gguf"
        export_checkpoint(folder, path, outtype)
        error = max_logits_error(model, path, 512)
        assert error < bound, (outtype, error)
        reader = gguf.GGUFReader(str(path))
        names = {t.name for t in reader.tensors}
        assert ("output.weight" in names) is not tied
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.attn_q.weight"] == {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]


def test_bpe_gqa_untied_logits(tmp_path, smollm2_chat_dir):
    model = tiny_model(49152, gqa=True, tied=False)
    folder = checkpoint(tmp_path, model, smollm2_chat_dir)
    export_checkpoint(folder, tmp_path / "m.gguf", "f32")
    assert max_logits_error(model, tmp_path / "m.gguf", 49152) < BOUNDS["f32"]


@needs_data
@pytest.mark.parametrize("gqa,tied", [(False, True), (True, False)])
def test_round_trip_lit_gguf_lit_is_bit_exact(tmp_path, gqa, tied):
    model = tiny_model(512, gqa, tied, seed=3)
    folder = checkpoint(tmp_path, model, "sp")
    export_checkpoint(folder, tmp_path / "m.gguf", "f32")
    convert_gguf(tmp_path / "m.gguf", tmp_path / "back", torch.float32, progress=False)
    with safe_open(str(folder / "lit_model.safetensors"), "pt") as a, safe_open(str(tmp_path / "back" / "lit_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() != b""
    back = Tokenizer.from_checkpoint(tmp_path / "back")
    ours = Tokenizer.from_checkpoint(folder)
    for text in SP_TEXTS:
        assert back.encode(text).tolist() == ours.encode(text).tolist(), text


@needs_data
@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 4.0},
                                     {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}])
def test_rope_scaling_round_trips(tmp_path, scaling):
    model = tiny_model(512, True, True, rope_scaling=scaling, rope_base=500000.0)
    folder = checkpoint(tmp_path, model, "sp")
    export_checkpoint(folder, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert any(t.name == "rope_freqs.weight" for t in reader.tensors) is (scaling["type"] == "llama3")
    convert_gguf(tmp_path / "m.gguf", tmp_path / "back", torch.float32, progress=False)
    back = LLaMAConfig(**json.loads((tmp_path / "back" / "lit_config.json").read_text()))
    assert back.rope_scaling == scaling and back.rope_base == 500000.0


# -------------------------------------------------------------------------------- the tokenizer
def check_tokenizer(folder: Path, path: Path) -> None:
    ours = Tokenizer.from_checkpoint(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert theirs(text).input_ids == ours.encode(text, bos=True).tolist(), text
    if ours.chat_template is not None:
        assert field(gguf.GGUFReader(str(path)), "tokenizer.chat_template") == ours.chat_template
        rendered = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        ref = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True)
        assert rendered == ref


def test_bpe_tokenizer_encodes_like_ours(tmp_path, smollm2_chat_dir):
    folder = checkpoint(tmp_path, tiny_model(49152, True, True), smollm2_chat_dir)
    export_checkpoint(folder, tmp_path / "m.gguf", "q8_0")
    # transformers' tokenizer.json of SmolLM2 (the fixture) splits digits like GPT-2, not like llama.cpp's smollm
    assert field(gguf.GGUFReader(str(tmp_path / "m.gguf")), "tokenizer.ggml.pre") == "gpt-2"
    check_tokenizer(folder, tmp_path / "m.gguf")


@needs_data
def test_sentencepiece_tokenizer_encodes_like_ours(tmp_path):
    folder = checkpoint(tmp_path, tiny_model(512, False, True), "sp")
    shutil.copyfile(DATA / "tok512.model", folder / "tokenizer.model")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    export_checkpoint(folder, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert field(reader, "tokenizer.ggml.model") == "llama" and field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.chat_template") == (folder / "chat_template.jinja").read_text()
    ours = Tokenizer.from_checkpoint(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert field(reader, "tokenizer.ggml.remove_extra_whitespaces") is True
    for text in SP_TEXTS:
        assert theirs(text).input_ids == ours.encode(text, bos=True).tolist(), text


@needs_smol
def test_smollm2_tokenizer_metadata_survives_gguf_lit_gguf(tmp_path):
    convert_gguf(DATA / SMOL, tmp_path / "lit", torch.float32, progress=False)
    export_checkpoint(tmp_path / "lit", tmp_path / "back.gguf", "q8_0")
    original, back = gguf.GGUFReader(str(DATA / SMOL)), gguf.GGUFReader(str(tmp_path / "back.gguf"))
    keys = [k for k in original.fields if k.startswith("tokenizer.")]
    assert len(keys) >= 12
    for key in keys:
        assert field(back, key) == field(original, key), key
    for key in ("llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count"):
        assert field(back, key) == field(original, key), key


# ------------------------------------------------------------------------------ LoRA and the CLI
@needs_data
def test_lora_is_merged_before_export(tmp_path):
    model = tiny_model(512, True, False)
    folder = checkpoint(tmp_path, model, "sp")
    lora = LoRAConfig(r=4, alpha=8, query=True, key=True, value=True, r_key=2, mlp=True, dropout=0.0)
    with torch.device("meta"):
        lora_model = build_lora_model(model.config, lora)
    lora_model.load_state_dict(model.state_dict(), strict=False, assign=True)
    torch.manual_seed(5)
    for layer in lora_layers(lora_model):
        layer.reset_lora_parameters(device="cpu", dtype=torch.float32)
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    save_adapter(lora_model, tmp_path / "a.lora.safetensors", lora)
    main = script_main("convert_lit_to_gguf.py")
    cli_run(main, args=["--checkpoint_dir", str(folder), "--lora_path", str(tmp_path / "a.lora.safetensors"),
                        "--output_path", str(tmp_path / "m.gguf"), "--outtype", "f32"])
    with torch.no_grad():
        assert max_logits_error(lora_model.eval(), tmp_path / "m.gguf", 512) < BOUNDS["f32"]
        assert max_logits_error(model, tmp_path / "m.gguf", 512) > 1e-3  # the adapter changed something


@needs_data
def test_cli_errors_are_one_line(tmp_path, capsys):
    folder = checkpoint(tmp_path, tiny_model(512, False, True), "sp")
    main = script_main("convert_lit_to_gguf.py")
    for args, said in ((["--output_path", str(tmp_path / "m.bin")], ".gguf"),
                       (["--output_path", str(tmp_path / "m.gguf"), "--outtype", "q4"], "outtype"),
                       (["--output_path", str(tmp_path / "m.gguf"), "--checkpoint_dir", str(tmp_path / "nope")], "does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            cli_run(main, args=["--checkpoint_dir", str(folder), *args])
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and said in errors[0], errors
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))
