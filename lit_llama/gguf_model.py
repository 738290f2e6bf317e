"""A .gguf file as a model to generate with, without converting it to a checkpoint folder first.

The config, the tokenizer and the chat template come from the file's metadata, as
scripts/convert_gguf_checkpoint.py writes them (`gguf_folder`: a temporary folder without the
weights). The weights are read one tensor at a time (lit_llama/convert_gguf.py's reader):

- float (--quantize none): every tensor dequantized by gguf's own `dequantize`, then cast.
- --quantize int4 (groups of 32): Q4_0 and Q4_1 matrices keep their codes. A block of 32 is
  exactly an int4 group (w = (q - 8) * scale + zero): Q4_0's w = d * (q - 8) is scale d, zero 0;
  Q4_1's w = d * q + m is scale d, zero m + 8 d. So the model computes with the file's own values
  (in fp32 exactly; in bf16 the fp16 d and m round to bf16). Other types (Q8_0, K-quants, floats)
  and other group sizes are dequantized, then quantized to int4.
- The head is int8 in both modes (lit_llama/weight_only.py says why); a tied head is quantized
  from the dequantized embedding.
- --quantize int8: every matrix dequantized, then quantized per output channel (Q8_0's scales
  are per 32 weights, which no per-channel int8 layout holds).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch

from lit_llama.convert_gguf import (
    check_tensors,
    config_from_gguf,
    dequantize,
    gguf_names_for,
    open_gguf,
    tokenizer_files,
    write_metadata_files,
)
from lit_llama.convert_hf import lit_shapes
from lit_llama.model import LLaMA
from lit_llama.weight_only import Int4Linear, QuantizeMode, check_quantize, head_mode, quantized_layer

Q = gguf.GGMLQuantizationType
Q4_BLOCK = 32  # weights per Q4_0 / Q4_1 block: one int4 group
# Bytes per block: fp16 d (and fp16 m for Q4_1), then 16 bytes of codes.
Q4_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20}


def is_gguf(path: Path | str) -> bool:
    """Is --checkpoint_dir a .gguf file rather than a checkpoint folder?"""
    return Path(path).suffix.lower() == ".gguf" and not Path(path).is_dir()


@contextmanager
def gguf_folder(path: Path | str) -> Iterator[Path]:
    """A temporary folder with the lit_config.json and the tokenizer files of a .gguf file (no
    weights), for what reads a checkpoint folder: `load_config`, `Tokenizer.from_checkpoint`."""
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    with tempfile.TemporaryDirectory(prefix="lit_llama_gguf_") as tmp:
        folder = Path(tmp)
        write_metadata_files(tokenizer_files(reader), config, folder)
        yield folder


def q4_codes(tensor: gguf.ReaderTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 or Q4_1 matrix's own values: codes (N, K) int32 in 0..15, scales and zeros (N, K / 32)
    float32, with w = (q - 8) * scale + zero as the int4 kernels compute it. In ggml's block, byte j
    of the 16 holds weight j in its low nibble and weight j + 16 in its high nibble."""
    N, K = (int(n) for n in reversed(tensor.shape))
    blocks = np.asarray(tensor.data).reshape(N, K // Q4_BLOCK, Q4_BYTES[tensor.tensor_type])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
    qs = blocks[..., -16:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32).reshape(N, K)
    if tensor.tensor_type == Q.Q4_0:
        zeros = np.zeros_like(d)
    else:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zeros = m + 8 * d
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zeros)


def int4_from_blocks(parts: list[gguf.ReaderTensor], dtype: torch.dtype, device: torch.device) -> Int4Linear:
    """One Int4Linear from the Q4_0/Q4_1 tensors stacked as its rows (c_attn: q, k, v)."""
    codes = [q4_codes(t) for t in parts]
    q, scales, zeros = (torch.cat([c[i] for c in codes]).to(device) for i in range(3))
    return Int4Linear(q, scales.to(dtype), zeros.to(dtype), Q4_BLOCK)


def load_gguf_model(
    path: Path | str, dtype: torch.dtype, device: torch.device | str, quantize: QuantizeMode = "none", group_size: int = 32,
) -> LLaMA:
    """The model of a llama .gguf file on `device`, float in `dtype` or weight-only quantized (see
    the module docstring), assembled tensor by tensor: one float matrix at a time is in memory."""
    device = torch.device(device)
    check_quantize(quantize, group_size, dtype, device)
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    tensors = check_tensors(reader, config)
    with torch.device("meta"):
        model = LLaMA(config)
    for lit_name in lit_shapes(config):
        parts = [tensors[name] for name in gguf_names_for(lit_name)]
        module_name, _, param = lit_name.rpartition(".")
        module = model.get_submodule(module_name)
        if quantize != "none" and isinstance(module, torch.nn.Linear):
            mode = head_mode(quantize) if module_name == "lm_head" else quantize
            set_module(model, module_name, quantized_from_gguf(parts, mode, group_size, dtype, device))
            continue
        value = torch.cat([torch.from_numpy(dequantize(t)) for t in parts]).to(device)
        if lit_name == "transformer.wte.weight" and config.tie_embeddings and quantize != "none":
            # The tied head: a quantized copy (int8, `head_mode`), from the dequantized embedding.
            set_module(model, "lm_head", quantized_layer(value, head_mode(quantize), group_size, dtype))
        setattr(module, param, torch.nn.Parameter(value.to(dtype), requires_grad=False))
    if config.tie_embeddings and quantize == "none":
        model.tie_weights()
    return model.eval()


def quantized_from_gguf(
    parts: list[gguf.ReaderTensor], quantize: QuantizeMode, group_size: int, dtype: torch.dtype, device: torch.device,
) -> torch.nn.Module:
    if quantize == "int4" and group_size == Q4_BLOCK and all(t.tensor_type in Q4_BYTES for t in parts):
        return int4_from_blocks(parts, dtype, device)
    weight = torch.cat([torch.from_numpy(dequantize(t)) for t in parts]).to(device)
    return quantized_layer(weight, quantize, group_size, dtype)


def set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
