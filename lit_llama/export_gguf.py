"""lit_llama -> GGUF (llama.cpp's format): a llama-architecture model file, written with `gguf.GGUFWriter`.

The mirror image of lit_llama/convert_gguf.py (the reader), with the same name table
(`LIT_TO_GGUF`) and the same layout facts:
  1. attn_q / attn_k rows are stored in Meta's interleaved-pair order, which is ours: no permutation;
     c_attn's rows [Q | K | V] are split into attn_q, attn_k, attn_v.
  2. The arrays written are row-major [out, in] (torch order); GGUF lists the shape reversed.
  3. A tied model has no output.weight (llama.cpp then uses token_embd as the head).
  4. llama3 RoPE scaling is the `rope_freqs.weight` tensor of per-pair divisors that llama.cpp's own
     converter writes (`llama3_rope_divisors`); linear scaling is llama.rope.scaling.type/factor.
  5. llama.cpp sizes the vocabulary by the token list, which must match token_embd's rows: the
     tokens are padded to padded_vocab_size with "[PAD{i}]" pieces of type UNUSED, as llama.cpp's
     converter pads, and llama.vocab_size is that row count.

Outtypes: f32, f16 and bf16 (every matrix in that type) and q8_0 (every matrix whose rows are a
multiple of 32 values, the embedding included, via gguf.quants.quantize; the others in F16). Norms and
other 1-D tensors stay F32, as llama.cpp keeps them.

The tensors are streamed: every tensor's type and size is known from the config, so the header is
written first and then one tensor at a time is read, converted and appended (peak memory: about one
tensor besides the model being read). The file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer as HFBackend

from lit_llama.adapter import copy_adapter_, load_adapter
from lit_llama.checkpoint import atomic_path, find_weights, load_config, open_weights
from lit_llama.convert_gguf import BPE_PRE_TOKENIZERS, ROPE_FREQS, gguf_names_for, llama3_rope_divisors
from lit_llama.convert_hf import lit_shapes
from lit_llama.hf_tokenizer_export import checkpoint_chat_template, proto_fields, sentencepiece_settings
from lit_llama.json_file import read_json
from lit_llama.lora import load_lora_model, merged_model
from lit_llama.model import LLaMAConfig
from lit_llama.qlora import match_training_base_
from lit_llama.tokenizer import HFTokenizer, Tokenizer

OutType = Literal["f32", "f16", "bf16", "q8_0"]
Q = gguf.GGMLQuantizationType
MATRIX_TYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
T = gguf.TokenType


# ------------------------------------------------------------------------------------------ tensors
def tensor_type(shape: tuple[int, ...], outtype: OutType) -> Q:
    """The GGUF type of a tensor of `shape` (torch order) in `outtype`: 1-D tensors stay F32; q8_0
    needs rows that are a multiple of its 32-value block (else F16, as llama.cpp falls back)."""
    if len(shape) < 2:
        return Q.F32
    qtype = MATRIX_TYPES[outtype]
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def encode_tensor(array: np.ndarray, qtype: Q) -> np.ndarray:
    """`array` (float32) as the bytes (or float array) GGUFWriter stores for `qtype`."""
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)  # BF16, Q8_0: uint8 rows


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def gguf_tensors(get: Callable[[str], torch.Tensor], config: LLaMAConfig) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(GGUF name, a function giving its float32 array [out, in]) for every tensor of the file, in
    llama.cpp's order: rope_freqs (llama3 scaling) first, then ours as `lit_shapes` lists them, c_attn split
    into attn_q, attn_k, attn_v. Nothing is read before its function is called."""
    scaling = config.rope_scaling
    if scaling is not None and scaling["type"] == "llama3":
        yield ROPE_FREQS, lambda: llama3_rope_divisors(config.head_size, config.rope_base, scaling).astype(np.float32)
    hs = config.head_size
    split = (config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs)
    starts = np.cumsum((0, *split))
    for lit_name in lit_shapes(config):
        names = gguf_names_for(lit_name)
        if len(names) == 1:
            yield names[0], lambda n=lit_name: get(n).float().numpy()
        else:
            for name, start, stop in zip(names, starts[:-1], starts[1:]):
                yield name, lambda n=lit_name, a=int(start), b=int(stop): get(n)[a:b].float().numpy()


def tensor_shapes(config: LLaMAConfig) -> dict[str, tuple[int, ...]]:
    """The shape (torch order) of every tensor `gguf_tensors` yields."""
    shapes: dict[str, tuple[int, ...]] = {}
    if config.rope_scaling is not None and config.rope_scaling["type"] == "llama3":
        shapes[ROPE_FREQS] = (config.head_size // 2,)
    hs = config.head_size
    split = (config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs)
    for lit_name, shape in lit_shapes(config).items():
        names = gguf_names_for(lit_name)
        if len(names) == 1:
            shapes[names[0]] = tuple(shape)
        else:
            shapes.update({name: (rows, shape[1]) for name, rows in zip(names, split)})
    return shapes


# ------------------------------------------------------------------------------------------- config
def add_config(writer: gguf.GGUFWriter, config: LLaMAConfig, name: str, outtype: OutType) -> None:
    """The llama.* and general.* metadata llama.cpp reads for a llama model."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    if config.head_size != config.n_embd // config.n_head:
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.padded_vocab_size)  # = token_embd's rows and the token list's length
    scaling = config.rope_scaling
    if scaling is not None and scaling["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling is not None and scaling["type"] == "llama3":
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))


# ---------------------------------------------------------------------------------------- tokenizer
# Text whose pre-tokenization tells the known splitting rules apart (digits, contractions, spaces, scripts).
_PRE_CHECK = ("Hello World! don't I'LL 12345 3.14159 \n\n\t  spaces   naïve café 日本語 🦙🚀 "
              "a\u00a0b <tag>x</tag> $1,000,000 ʼmmm 'quoted' ___ ...")


# The names written, first match wins (convert_gguf reads their aliases too; "default" is llama.cpp's own regex set).
PRE_NAMES = ("smollm", "llama-bpe", "gpt-2")


def bpe_pre_name(backend: HFBackend) -> str | None:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json's pre-tokenizer: the first rule in
    convert_gguf's `BPE_PRE_TOKENIZERS` that splits `_PRE_CHECK` the same way (None: none does)."""
    pre = backend.pre_tokenizer
    if pre is None:
        return None
    ours = [piece for piece, _ in pre.pre_tokenize_str(_PRE_CHECK)]
    ignore = bool(getattr(backend.model, "ignore_merges", False))
    for name in PRE_NAMES:
        make, ignore_merges = BPE_PRE_TOKENIZERS[name]
        if ignore == ignore_merges and [piece for piece, _ in make().pre_tokenize_str(_PRE_CHECK)] == ours:
            return name
    return None


def _pad_tokens(tokens: list[str], types: list[int], rows: int, scores: list[float] | None = None) -> None:
    if len(tokens) > rows:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {rows} rows; "
                         "the tokenizer does not belong to this checkpoint")
    for i in range(len(tokens), rows):
        tokens.append(f"[PAD{i}]")
        types.append(T.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _add_special_ids(writer: gguf.GGUFWriter, bos: int | None, eos: int | None, unk: int | None, pad: int | None) -> None:
    for value, add in ((bos, writer.add_bos_token_id), (eos, writer.add_eos_token_id),
                       (unk, writer.add_unk_token_id), (pad, writer.add_pad_token_id)):
        if value is not None:
            add(int(value))


def add_bpe_tokenizer(writer: gguf.GGUFWriter, tokenizer: HFTokenizer, rows: int) -> None:
    """tokenizer.ggml.* for a byte-level BPE tokenizer.json (model gpt2): tokens at their ids, types
    (special added tokens CONTROL, other added tokens USER_DEFINED), merges in rank order, pre."""
    backend = tokenizer.backend
    model = backend.to_str()
    if '"type":"BPE"' not in model.replace(" ", ""):
        raise ValueError("the tokenizer.json is not a BPE model; llama.cpp's gpt2 vocabulary is byte-level BPE")
    vocab = backend.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    tokens: list[str | None] = [None] * n
    for token, i in vocab.items():
        tokens[i] = token
    if None in tokens:
        raise ValueError(f"the tokenizer.json has no token for id {tokens.index(None)}; GGUF needs every id 0..{n - 1}")
    types = [int(T.NORMAL)] * n
    for i, added in backend.get_added_tokens_decoder().items():
        types[i] = int(T.CONTROL if added.special else T.USER_DEFINED)
    _pad_tokens(tokens, types, rows)
    state = json.loads(model)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    pre = bpe_pre_name(backend)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    first = backend.pre_tokenizer.pre_tokenize_str("a")[0][0] if backend.pre_tokenizer is not None else "a"
    writer.add_add_space_prefix(first.startswith("\u0120"))  # ByteLevel(add_prefix_space=True) writes "Ġa"
    config_path = tokenizer.path.parent / "tokenizer_config.json"
    unk = read_json(config_path, remedy="fix or remove it").get("unk_token") if config_path.is_file() else None
    unk = unk.get("content") if isinstance(unk, dict) else unk
    _add_special_ids(writer, tokenizer.bos_id, tokenizer.eos_id, backend.token_to_id(unk) if unk else None, tokenizer.pad_id)
    writer.add_add_bos_token(bool(tokenizer.add_bos))


def add_sentencepiece_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, rows: int) -> None:
    """tokenizer.ggml.* for a SentencePiece tokenizer.model (model llama): pieces, scores and piece
    types as the file has them (SentencePiece's types are llama.cpp's token types), the dummy prefix
    from its normalizer, BOS first; the special tokens a merged adapter added (special_tokens.json)
    follow as USER_DEFINED tokens, which llama.cpp matches whole in the text as our Tokenizer does."""
    sp = tokenizer.processor
    serialized = tokenizer.path.read_bytes()
    types = [int(dict(proto_fields(value)).get(3, 1)) for number, value in proto_fields(serialized) if number == 1]
    tokens = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    scores = [float(sp.get_score(i)) for i in range(sp.vocab_size())]
    if len(types) != len(tokens):
        raise ValueError(f"{str(tokenizer.path)!r} lists {len(types)} pieces but sentencepiece reads {len(tokens)}; is it damaged?")
    for token in tokenizer.special_tokens:
        tokens.append(token)
        scores.append(0.0)
        types.append(int(T.USER_DEFINED))
    _pad_tokens(tokens, types, rows, scores)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    settings = sentencepiece_settings(serialized)
    writer.add_add_space_prefix(bool(settings["add_dummy_prefix"]))
    if settings["remove_extra_whitespaces"]:
        # llama.cpp's SentencePiece (llama) tokenizer and transformers' GGUF tokenizer keep every space; the
        # key is llama.cpp's (read by its UGM vocabularies), written so that the setting is on record.
        writer.add_remove_extra_whitespaces(True)
        print(f"warning: {tokenizer.path.name} collapses runs of spaces, which llama.cpp's llama tokenizer does not: "
              "text with repeated spaces will encode differently there", file=sys.stderr)
    ids = [i if i is not None and i >= 0 else None for i in (tokenizer.bos_id, tokenizer.eos_id, sp.unk_id(), sp.pad_id())]
    _add_special_ids(writer, *ids)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def add_tokenizer(writer: gguf.GGUFWriter, checkpoint_dir: Path, rows: int, special_tokens: tuple[str, ...] = ()) -> bool:
    """The checkpoint's tokenizer and chat template as tokenizer.* metadata; False when it has none."""
    try:
        tokenizer = Tokenizer.from_checkpoint(checkpoint_dir, special_tokens=special_tokens)
    except FileNotFoundError:
        return False
    if isinstance(tokenizer, HFTokenizer):
        add_bpe_tokenizer(writer, tokenizer, rows)
        template = tokenizer.chat_template
    else:
        add_sentencepiece_tokenizer(writer, tokenizer, rows)
        template = checkpoint_chat_template(checkpoint_dir)
    if template is not None:
        writer.add_chat_template(template)
    return True


# ------------------------------------------------------------------------------------------- export
def write_gguf(
    path: Path | str, config: LLaMAConfig, get: Callable[[str], torch.Tensor], checkpoint_dir: Path | str,
    outtype: OutType = "f16", name: str = "", special_tokens: tuple[str, ...] = (),
) -> dict[str, int]:
    """Write the GGUF file `path` of a model `config` whose tensors `get(lit_name)` returns, with the
    tokenizer of `checkpoint_dir`; atomic (a temporary name, renamed). Returns the count of each
    tensor type written, e.g. {"Q8_0": 211, "F32": 61}."""
    if outtype not in MATRIX_TYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {', '.join(MATRIX_TYPES)}")
    shapes = tensor_shapes(config)
    types = {n: tensor_type(s, outtype) for n, s in shapes.items()}
    counts: dict[str, int] = {}
    for qtype in types.values():
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        try:
            add_config(writer, config, name or Path(checkpoint_dir).name, outtype)
            add_tokenizer(writer, Path(checkpoint_dir), config.padded_vocab_size, special_tokens)
            for tensor_name, shape in shapes.items():
                qtype = types[tensor_name]
                if qtype in (Q.F32, Q.F16):
                    writer.add_tensor_info(tensor_name, shape, np.dtype(np.float32 if qtype == Q.F32 else np.float16),
                                           _nbytes(shape, qtype))
                else:
                    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                    writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), _nbytes(shape, qtype), raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor_name, load in gguf_tensors(get, config):
                array = load()
                if tuple(array.shape) != shapes[tensor_name]:
                    raise ValueError(f"{tensor_name} has shape {tuple(array.shape)}, the config implies {shapes[tensor_name]}")
                writer.write_tensor_data(encode_tensor(array, types[tensor_name]))
        finally:
            writer.close()
    return counts


def checkpoint_getter(checkpoint_dir: Path | str, config: LLaMAConfig) -> Callable[[str], torch.Tensor]:
    """Our tensors by name, read one at a time from the checkpoint's weights file; a tied
    checkpoint saved with its head too is fine (the head is the embedding)."""
    weights = find_weights(checkpoint_dir)
    names, get = open_weights(weights)
    expected = set(lit_shapes(config))
    missing = sorted(expected - set(names))
    extra = sorted(set(names) - expected - ({"lm_head.weight"} if config.tie_embeddings else set()))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ValueError(f"{weights} does not match lit_config.json ({what}); pass a base checkpoint, with "
                         "--lora_path for an adapter")
    return get


def export_checkpoint(
    checkpoint_dir: Path | str, output_path: Path | str, outtype: OutType = "f16", lora_path: Path | str | None = None,
    name: str = "",
) -> dict[str, int]:
    """A checkpoint folder (plus, with `lora_path`, its adapter merged in fp32 first) as one GGUF file."""
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    special: tuple[str, ...] = ()
    if lora_path is None:
        get = checkpoint_getter(checkpoint_dir, config)
    else:
        adapter, meta = load_adapter(lora_path)
        model = load_lora_model(checkpoint_dir, meta.lora, dtype=torch.float32, config=config)
        match_training_base_(model, meta.quantize)  # trained with --quantize: merged into the dequantized base
        copy_adapter_(model, adapter, meta, Path(lora_path).name)
        merged = merged_model(model)
        config, special = merged.config, tuple(meta.special_tokens)
        state = merged.state_dict()
        get = state.__getitem__
    print(f"Writing {output_path} ({outtype})", file=sys.stderr)
    return write_gguf(output_path, config, get, checkpoint_dir, outtype, name, special)
