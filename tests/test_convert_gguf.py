"""The GGUF converter against the references: transformers' own GGUF loader (its own reader and
dequantizer) for the logits, greedy generation and the tokenizer; gguf's own dequantize for every
tensor; SentencePiece's original model for a SentencePiece vocabulary. On the real SmolLM2-135M-Instruct
Q4_1 file (skipped when ../shared/data is absent) and on small GGUF files written here with
gguf.GGUFWriter (every type the converter promises: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q4_K, Q5_K, Q6_K)."""

from __future__ import annotations

import hashlib
import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lit_llama.checkpoint import load_model, read_checksums
from lit_llama.cli import run as cli_run
from lit_llama.convert_gguf import config_from_gguf, convert_gguf, open_gguf, sentencepiece_model
from lit_llama.generation import generate
from lit_llama.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
Q = gguf.GGMLQuantizationType
needs_smol = pytest.mark.skipif(not (DATA / SMOL).is_file(), reason=f"{DATA / SMOL} is absent")


def chatml(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [
    chatml("What is the capital of France?"),
    chatml("Write a haiku about the sea."),
    chatml("How many legs does a spider have? Answer with a number."),
]
TEXTS = [
    "", "Hello world", "  leading and   inner   spaces\t\ttabs\n\n\nnewlines  ", "12345 + 678 = 13023, 3.14159",
    "naïve café, Ærøskøbing, Zürich; 日本語のテキスト; русский текст", "emoji: 🦙🚀👍🏽 and 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "don't you'll I'M we've", "trailing space ", "\u00a0nbsp and \u200bzero width",
]


def script_main():
    """scripts/convert_gguf_checkpoint.py's main, to run its command line in this process."""
    return runpy.run_path(str(REPO / "scripts" / "convert_gguf_checkpoint.py"))["main"]


def cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_run(script_main(), args=args)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


# ------------------------------------------------------------------------------- the real file
@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    if not (DATA / SMOL).is_file():
        pytest.skip(f"{DATA / SMOL} is absent")
    out = tmp_path_factory.mktemp("smol") / "lit"
    convert_gguf(DATA / SMOL, out, torch.float32, progress=False)
    return out


@pytest.fixture(scope="module")
def hf_smol():
    if not (DATA / SMOL).is_file():
        pytest.skip(f"{DATA / SMOL} is absent")
    return transformers.AutoModelForCausalLM.from_pretrained(str(DATA), gguf_file=SMOL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_smol_tokenizer():
    if not (DATA / SMOL).is_file():
        pytest.skip(f"{DATA / SMOL} is absent")
    return transformers.AutoTokenizer.from_pretrained(str(DATA), gguf_file=SMOL)


@needs_smol
def test_smol_config_from_metadata(smol_dir):
    config = json.loads((smol_dir / "lit_config.json").read_text())
    assert {k: config[k] for k in ("n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size",
                                   "vocab_size", "padded_vocab_size", "block_size", "rope_base", "tie_embeddings",
                                   "rope_scaling")} == dict(
        n_layer=30, n_embd=576, n_head=9, n_query_groups=3, head_size=64, intermediate_size=1536, vocab_size=49152,
        padded_vocab_size=49152, block_size=8192, rope_base=100000.0, tie_embeddings=True, rope_scaling=None)
    assert config["norm_eps"] == pytest.approx(1e-5, rel=1e-6)
    assert sorted(p.name for p in smol_dir.iterdir()) == [
        "checksums.sha256", "generation_config.json", "lit_config.json", "lit_model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    # The converter records the weights' sha256 for scripts/verify_checkpoint.py, as hashlib computes it.
    weights = (smol_dir / "lit_model.safetensors").read_bytes()
    assert read_checksums(smol_dir) == {"lit_model.safetensors": hashlib.sha256(weights).hexdigest()}


@needs_smol
def test_smol_every_tensor_is_gguf_dequantize_exactly(smol_dir):
    """Names, shapes and orientation: each of our tensors is gguf.dequantize of the GGUF tensor(s)
    it comes from (the fused c_attn is [attn_q; attn_k; attn_v]), bit for bit, for every type present."""
    reader = gguf.GGUFReader(str(DATA / SMOL))
    ref = {t.name: t for t in reader.tensors}

    def deq(name: str) -> np.ndarray:
        t = ref[name]
        return gguf.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))

    per_layer = {"rms_1.weight": ["attn_norm"], "attn.c_attn.weight": ["attn_q", "attn_k", "attn_v"],
                 "attn.c_proj.weight": ["attn_output"], "rms_2.weight": ["ffn_norm"], "mlp.c_fc1.weight": ["ffn_gate"],
                 "mlp.c_fc2.weight": ["ffn_up"], "mlp.c_proj.weight": ["ffn_down"]}
    seen_types = set()
    with safe_open(str(smol_dir / "lit_model.safetensors"), framework="np") as f:
        assert sorted(f.keys()) == sorted(["transformer.wte.weight", "transformer.ln_f.weight"]
                                          + [f"transformer.h.{i}.{k}" for i in range(30) for k in per_layer])
        pairs = [("transformer.wte.weight", ["token_embd.weight"]), ("transformer.ln_f.weight", ["output_norm.weight"])]
        pairs += [(f"transformer.h.{i}.{k}", [f"blk.{i}.{g}.weight" for g in v]) for i in range(30) for k, v in per_layer.items()]
        for ours, theirs in pairs:
            np.testing.assert_array_equal(f.get_tensor(ours), np.concatenate([deq(n) for n in theirs], axis=0), err_msg=ours)
            seen_types.update(ref[n].tensor_type for n in theirs)
    assert seen_types == {Q.Q4_1, Q.Q8_0, Q.F32}


@needs_smol
def test_smol_logits_match_transformers_gguf_loader(smol_dir, hf_smol, hf_smol_tokenizer):
    ours = load_model(smol_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_checkpoint(smol_dir)
    deltas = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, bos=True)
        assert ids.tolist() == hf_smol_tokenizer(prompt).input_ids  # no BOS for SmolLM2 (add_bos_token false)
        with torch.no_grad():
            delta = (ours(ids[None]) - hf_smol(ids[None]).logits).abs().max().item()
        deltas.append(delta)
    print("max |delta logits| per prompt:", [f"{d:.2e}" for d in deltas])
    assert max(deltas) <= 1e-4, deltas


@needs_smol
@pytest.mark.usefixtures("one_thread")  # 128 one-token steps: threads only add hand-offs (minutes on a busy machine)
def test_smol_greedy_generation_matches_transformers(smol_dir, hf_smol):
    ours = load_model(smol_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_checkpoint(smol_dir)
    ids = tokenizer.encode(chatml("Write a short story about a llama who learns to code."), bos=True)
    # 64 tokens from both, EOS not stopping either (the same continuation, token for token).
    (mine,) = generate(ours, [ids], max_new_tokens=64, temperature=0.0, stop_ids=None)
    theirs = hf_smol.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False, max_new_tokens=64,
                              min_new_tokens=0, eos_token_id=None, pad_token_id=tokenizer.pad_id)[0]
    assert len(mine) == len(theirs) == len(ids) + 64
    print("greedy continuation:", repr(tokenizer.decode(mine[len(ids):])))
    assert mine.tolist() == theirs.tolist(), (tokenizer.decode(mine[len(ids):]), tokenizer.decode(theirs[len(ids):]))
    # The documented answer, from the first prompt.
    question = tokenizer.encode(PROMPTS[0], bos=True)
    (answer,) = generate(ours, [question], max_new_tokens=16, temperature=0.0, stop_ids=tokenizer.stop_ids)
    assert tokenizer.decode(answer[len(question):]) == "The capital of France is Paris."


@needs_smol
def test_smol_tokenizer_matches_transformers(smol_dir, hf_smol_tokenizer):
    tokenizer = Tokenizer.from_checkpoint(smol_dir)
    hf = hf_smol_tokenizer
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.add_bos) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, False)
    assert tokenizer.vocab_size == len(hf) == 49152
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=False).tolist()
        assert ids == hf(text, add_special_tokens=False).input_ids, text
        assert tokenizer.encode(text, bos=True).tolist() == hf(text).input_ids, text
        assert tokenizer.decode(ids) == hf.decode(ids) == text, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
    template = gguf.GGUFReader(str(DATA / SMOL)).fields["tokenizer.chat_template"].contents()
    assert tokenizer.chat_template == template == hf.chat_template
    assert tokenizer.chat_template.encode() == template.encode()


# ------------------------------------------------------------------------- small synthetic files
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE tokens are spelled in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "in g", "Ġ a", "Ġa n", "Ġan d", "1 2"]


def tiny_vocab() -> list[str]:
    tokens = SPECIALS + list(_bytes_to_unicode().values())
    return tokens + ["".join(m.split(" ")) for m in MERGES]


# Each weight matrix of the 2-layer model stored in a different type (the K-quants need rows of 256).
LAYER_TYPES = [
    dict(attn_q=Q.F16, attn_k=Q.BF16, attn_v=Q.Q8_0, attn_output=Q.Q4_0, ffn_gate=Q.Q4_1, ffn_up=Q.Q4_K, ffn_down=Q.Q5_K),
    dict(attn_q=Q.Q6_K, attn_k=Q.Q5_0, attn_v=Q.Q5_1, attn_output=Q.F32, ffn_gate=Q.Q4_K, ffn_up=Q.Q6_K, ffn_down=Q.Q8_0),
]
# Byte offset of the fp16 scale(s) in one 256-value block of each K-quant (ggml-common.h's block layouts).
_K_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _tensor_data(rng: np.random.Generator, shape: tuple[int, int], qtype) -> np.ndarray:
    """Data for one tensor of torch `shape` in `qtype`: gguf.quantize of random values where gguf
    implements it, else random K-quant blocks with small finite fp16 scales."""
    if qtype not in _K_SCALES:
        x = rng.normal(0.0, 0.05, size=shape).astype(np.float32)
        return x if qtype == Q.F32 else gguf.quantize(x, qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(shape[0], shape[1] // block, type_size), dtype=np.uint8)
    for offset in _K_SCALES[qtype]:
        scales = rng.uniform(0.0005, 0.002, size=blocks.shape[:2]).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(shape[0], -1)


def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = False, extra=None, tokenizer: str = "gpt2",
                    raw: dict | None = None) -> None:
    """A 2-layer llama GGUF (C 256, 4 heads of 64, 2 KV heads) with random weights in LAYER_TYPES,
    a tiny byte-level BPE vocabulary (`tokenizer` "" for none); `raw` replaces tensors by
    (bytes, type), `extra(writer)` adds more."""
    C, F, L, nh, ng, hs = 256, 512, 2, 4, 2, 64
    tokens = tiny_vocab()
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(nh)
    w.add_head_count_kv(ng)
    w.add_rope_freq_base(20000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_rope_dimension_count(hs)
    if tokenizer:
        w.add_tokenizer_model(tokenizer)
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types([3] * len(SPECIALS) + [1] * (V - len(SPECIALS)))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(0)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    rng = np.random.default_rng(0)
    raw = raw or {}
    add = w.add_tensor

    def add_tensor(name, data, raw_dtype=None):
        data, raw_dtype = raw.get(name, (data, raw_dtype))
        add(name, data, raw_dtype=raw_dtype)

    w.add_tensor = add_tensor
    w.add_tensor("token_embd.weight", _tensor_data(rng, (V, C), Q.F16), raw_dtype=Q.F16)
    shapes = dict(attn_q=(nh * hs, C), attn_k=(ng * hs, C), attn_v=(ng * hs, C), attn_output=(C, nh * hs),
                  ffn_gate=(F, C), ffn_up=(F, C), ffn_down=(C, F))
    for i, types in enumerate(LAYER_TYPES):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.uniform(0.5, 1.5, C).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", rng.uniform(0.5, 1.5, C).astype(np.float32))
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", _tensor_data(rng, shape, types[name]), raw_dtype=types[name])
    w.add_tensor("output_norm.weight", rng.uniform(0.5, 1.5, C).astype(np.float32))
    if not tied:
        w.add_tensor("output.weight", _tensor_data(rng, (V, C), Q.Q8_0), raw_dtype=Q.Q8_0)
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_tiny_gguf(folder / "tiny.gguf")
    return folder


def test_tiny_every_type_matches_transformers_gguf_loader(tiny, tmp_path):
    """F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K in one model: our logits vs
    transformers' (its own dequantizer), and each tensor vs gguf.dequantize."""
    out = tmp_path / "lit"
    convert_gguf(tiny / "tiny.gguf", out, progress=False)
    ours = load_model(out)
    assert not ours.config.tie_embeddings and ours.config.head_size == 64 and ours.config.n_query_groups == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 70, 200, 3, 99, 260, 1, 17, 42, 8, 150, 33]])
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)
    assert theirs.abs().max() > 0.1  # a model that computes something
    assert (mine - theirs).abs().max().item() <= 1e-4
    reader = gguf.GGUFReader(str(tiny / "tiny.gguf"))
    ref = {t.name: gguf.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    sd = ours.state_dict()
    for i, types in enumerate(LAYER_TYPES):
        qkv = np.concatenate([ref[f"blk.{i}.attn_{n}.weight"] for n in "qkv"])
        np.testing.assert_array_equal(sd[f"transformer.h.{i}.attn.c_attn.weight"].numpy(), qkv)
        np.testing.assert_array_equal(sd[f"transformer.h.{i}.mlp.c_fc2.weight"].numpy(), ref[f"blk.{i}.ffn_up.weight"])
        np.testing.assert_array_equal(sd[f"transformer.h.{i}.mlp.c_proj.weight"].numpy(), ref[f"blk.{i}.ffn_down.weight"])
    np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), ref["output.weight"])


def test_tiny_bpe_tokenizer_matches_transformers(tiny, tmp_path):
    """The llama-bpe pre-tokenizer (Llama 3's split), BOS added by the post-processor (add_bos_token)."""
    out = tmp_path / "lit"
    convert_gguf(tiny / "tiny.gguf", out, torch.bfloat16, progress=False)
    tokenizer = Tokenizer.from_checkpoint(out)
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny), gguf_file="tiny.gguf")
    assert tokenizer.add_bos and tokenizer.bos_id == 0 and tokenizer.eos_id == 2
    for text in TEXTS + ["the thing and the 1234 ring  and\n\nthen"]:
        assert tokenizer.encode(text, bos=False).tolist() == hf(text, add_special_tokens=False).input_ids, text
        assert tokenizer.encode(text, bos=True).tolist() == hf(text).input_ids, text
        assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text
    assert tokenizer.chat_template == hf.chat_template
    with safe_open(str(out / "lit_model.safetensors"), framework="pt") as f:
        assert f.get_tensor("transformer.wte.weight").dtype == torch.bfloat16


def test_sentencepiece_vocabulary_becomes_tokenizer_model(tmp_path):
    """A llama (SentencePiece) vocabulary, as llama.cpp writes Meta's tokenizer.model into a GGUF,
    comes back as a tokenizer.model that encodes like the original."""
    original = DATA / "llama-tokenizer.model"
    if not original.is_file():
        pytest.skip(f"{original} is absent")
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(original))
    n = sp.vocab_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 4 if sp.is_unused(i) else 1
             for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model(open_gguf(tmp_path / "sp.gguf")))
    ours = Tokenizer(tmp_path / "tokenizer.model")
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, 32000)
    for text in TEXTS + ["Hello world", "I believe the meaning of life is"]:
        assert ours.encode(text, bos=True).tolist() == [1] + sp.encode(text), text
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text))


# ---------------------------------------------------------------------------------- RoPE scaling
def _llama_cpp_rope_factors(head_size: int, base: float, factor: float, low: float, high: float, original: int) -> list[float]:
    """What llama.cpp's convert_hf_to_gguf.py writes as rope_freqs.weight for a llama3 rope_scaling."""
    factors = []
    for j in range(0, head_size, 2):
        freq = 1.0 / base ** (j / head_size)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def test_rope_scaling_from_metadata(tmp_path):
    def rope_freqs(scale: float):
        def add(w):
            f = np.array(_llama_cpp_rope_factors(64, 20000.0, 8.0, 1.0, 4.0, 8192), dtype=np.float32) * scale
            w.add_tensor("rope_freqs.weight", f)
        return add

    write_tiny_gguf(tmp_path / "llama3.gguf", extra=rope_freqs(1.0), tokenizer="")
    assert config_from_gguf(open_gguf(tmp_path / "llama3.gguf")).rope_scaling == dict(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    write_tiny_gguf(tmp_path / "odd.gguf", extra=rope_freqs(1.01), tokenizer="")
    with pytest.raises(ValueError, match="rope_freqs.weight .* matches no llama3 scaling"):
        config_from_gguf(open_gguf(tmp_path / "odd.gguf"))

    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    write_tiny_gguf(tmp_path / "linear.gguf", extra=linear, tokenizer="")
    assert config_from_gguf(open_gguf(tmp_path / "linear.gguf")).rope_scaling == {"type": "linear", "factor": 4.0}


# ---------------------------------------------------------------------------------------- errors
def test_non_llama_architecture_is_one_error_line(tmp_path, capsys):
    write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2", tokenizer="")
    error = cli_error(["--gguf_path", str(tmp_path / "qwen.gguf"), "--output_dir", str(tmp_path / "out")], capsys)
    assert "general.architecture is 'qwen2', not 'llama'" in error
    assert not (tmp_path / "out").exists()


def test_type_gguf_cannot_dequantize_is_one_error_line(tmp_path, capsys):
    _, size = gguf.GGML_QUANT_SIZES[Q.Q8_K]  # a type gguf knows but cannot dequantize, for a 256-wide norm
    write_tiny_gguf(tmp_path / "q8k.gguf", tokenizer="", raw={"blk.1.ffn_norm.weight": (np.zeros(size, np.uint8), Q.Q8_K)})
    error = cli_error(["--gguf_path", str(tmp_path / "q8k.gguf"), "--output_dir", str(tmp_path / "out")], capsys)
    assert "tensor type Q8_K (e.g. blk.1.ffn_norm.weight) cannot be dequantized" in error
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "q8k.gguf"]


def test_other_bad_input_is_one_error_line(tmp_path, capsys):
    assert "does not exist" in cli_error(["--gguf_path", str(tmp_path / "nope.gguf"), "--output_dir", str(tmp_path / "o")], capsys)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert "is not a GGUF file" in cli_error(["--gguf_path", str(tmp_path / "junk.gguf"), "--output_dir", str(tmp_path / "o")], capsys)
    write_tiny_gguf(tmp_path / "t.gguf", tokenizer="")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "exists and is not an empty folder" in cli_error(["--gguf_path", str(tmp_path / "t.gguf"), "--output_dir", str(tmp_path / "full")], capsys)
