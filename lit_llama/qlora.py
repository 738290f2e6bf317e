"""QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): LoRA on a base stored quantized.

The frozen linear layers of every Block (attn.c_attn, attn.c_proj, mlp.c_fc1, mlp.c_fc2, mlp.c_proj)
are stored by bitsandbytes, in one of three modes (`--quantize` of finetune/lora.py):
    nf4      4-bit NormalFloat codes, one fp32 absmax per block of 64 weights  (~4.5 bits a weight)
    nf4-dq   nf4 with the absmaxes quantized again to 8 bits ("double quantization", ~4.1 bits)
    int8     one int8 per weight and one scale per output row (LLM.int8's weight format)
The LoRA matrices stay fp32 (bf16 under bf16-true, as without quantization) and the compute runs in
the precision's dtype: a quantized layer dequantizes its weight for each matmul.

Not quantized: the token embedding and the head, the norms. A lookup needs rows, which bitsandbytes'
4-bit layers do not give, and in tied models (SmolLM2, Llama 3.2) the head *is* the embedding; the
chunked loss (lit_llama/training.py) also reads the head's weight directly. transformers' and PEFT's
QLoRA keep the head in float too (llm_int8_skip_modules). On SmolLM2-135M that leaves 28.3M of 134.5M
weights in bf16.

The flow:
    model = load_quantized_lora_model(checkpoint_dir, lora, "nf4", torch.bfloat16)  # tensor by tensor
    ... train; save_adapter(model, path, lora, quantize="nf4") ...
A float LoRA model (scripts/benchmark.py builds one) is quantized in place with
`quantize_frozen_base(model, mode, compute_dtype)`. To merge or generate with such an adapter, the
float base is first rounded the way training saw it: `round_base_as_quantized_(model, mode)`.

bitsandbytes is optional: imported only here, and only when a mode other than "none" is asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from safetensors import safe_open

from lit_llama.checkpoint import check_keys, find_weights, load_config, open_weights
from lit_llama.lora import LoRAConfig, MergedLinear, add_lora, lora_layers
from lit_llama.model import LLaMA, LLaMAConfig

QuantizeMode = Literal["none", "nf4", "nf4-dq", "int8"]
QUANTIZE_MODES = ("none", "nf4", "nf4-dq", "int8")
FROZEN_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc1", "mlp.c_fc2", "mlp.c_proj")  # paths in a Block
BLOCKSIZE = 64  # weights per absmax in nf4 (bitsandbytes' and the QLoRA paper's default)
PIP = "pip install 'bitsandbytes>=0.45'  (or pip install -e '.[qlora]')"


def import_bitsandbytes() -> Any:
    """bitsandbytes, or a one-line error that says how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError(f"--quantize needs the bitsandbytes package: {PIP}") from None
    return bitsandbytes


def check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")


# ------------------------------------------------------------------------------------------ layers
def quantized_linear(
    weight: torch.Tensor, mode: QuantizeMode, compute_dtype: torch.dtype, device: torch.device | str, name: str = "",
) -> nn.Module:
    """A bitsandbytes linear layer (no bias) holding `weight` (out, in) quantized. The weight is
    quantized from the tensor as given (any float dtype: 4-bit works on its fp32 values), so the
    same checkpoint tensor gives the same codes whatever the training precision."""
    bnb = import_bitsandbytes()
    out_features, in_features = weight.shape
    device = torch.device(device)
    weight = weight.detach()
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=0.0,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        return layer.to(device)  # Int8Params quantizes on the move to a device
    if device.type == "cpu" and in_features % BLOCKSIZE:
        # bitsandbytes 0.50's CPU dequantize kernel indexes the absmax by row and misreads rows that
        # do not start on a block boundary (checked in tests/test_qlora.py against a plain NF4 decode).
        raise ValueError(f"--quantize {mode} on CPU needs layers whose input size is a multiple of {BLOCKSIZE} "
                         f"(bitsandbytes' CPU 4-bit kernel misreads other rows); {name or 'a layer'} has {in_features}: "
                         "use --quantize int8, or a GPU")
    double = mode == "nf4-dq"
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype, quant_type="nf4",
                              compress_statistics=double, device="meta")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=double,
                                     blocksize=BLOCKSIZE)
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place for its inference kernel at
    # the first eval forward; after that dequantize_4bit misreads it and training forwards give the
    # input no gradient. Keep the one layout that training, merging and validation all read.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(device)  # Params4bit quantizes on the move to a device


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The weight (out, in) a quantized layer computes with, in fp32."""
    bnb = import_bitsandbytes()
    w = layer.weight
    if isinstance(w, bnb.nn.Int8Params):
        return w.data.float() * (w.SCB.float()[:, None] / 127.0)  # row scale: absmax / 127
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()


class QuantizedMergedLinear(MergedLinear):
    """A `MergedLinear` (LoRA on row slices of a frozen weight) whose frozen weight lives in `base`, a
    bitsandbytes layer. The LoRA parameters (and their slices, dropout, scaling) are `layer`'s own
    objects. Merging needs a float weight: merge the adapter with scripts/merge_lora.py instead."""

    def __init__(self, layer: MergedLinear, base: nn.Module) -> None:
        with torch.device("meta"):  # the slice bookkeeping, without allocating a weight
            super().__init__(layer.in_features, layer.slice_sizes, layer.ranks, layer.alpha, 0.0, layer.enable_lora,
                             names=layer.names)
        del self.weight
        self.lora_A, self.lora_B, self.lora_dropout = layer.lora_A, layer.lora_B, layer.lora_dropout
        self.base = base
        self.train(layer.training)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)  # (B, T, out), in x's dtype

    def merge(self) -> None:
        raise ValueError("a quantized base cannot take merged LoRA weights; merge the saved adapter into the float "
                         "checkpoint with scripts/merge_lora.py")

    unmerge = merge


def _frozen_linears(model: LLaMA) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(checkpoint name of the weight, parent module, attribute, layer) for every frozen Block linear."""
    out = []
    for i, block in enumerate(model.transformer.h):
        for path in FROZEN_LINEARS:
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            out.append((f"transformer.h.{i}.{path}.weight", parent, attr, getattr(parent, attr)))
    return out


def quantize_frozen_base(
    model: LLaMA, mode: QuantizeMode, compute_dtype: torch.dtype, device: torch.device | str | None = None,
    weights: Callable[[str], torch.Tensor] | None = None,
) -> LLaMA:
    """Quantize every frozen Block linear of `model` (plain or with LoRA) in place, one layer at a
    time, and return `model` (with `model.quantize_mode = mode`). LoRA targets become
    `QuantizedMergedLinear`s around their LoRA parameters; other layers become bitsandbytes layers.
    Each layer's float weight is taken from `weights(name)` when given (a checkpoint read tensor by
    tensor), else from the layer; `device`: where the quantized weights go (default: the LoRA's or
    the weight's device). The embedding, head and norms are left as they are (see the module doc)."""
    check_mode(mode)
    if mode == "none":
        return model
    if getattr(model, "quantize_mode", "none") != "none":
        raise ValueError("this model's base is quantized already")
    for name, parent, attr, layer in _frozen_linears(model):
        weight = weights(name) if weights is not None else layer.weight
        where = device if device is not None else (layer.lora_A.device if isinstance(layer, MergedLinear) else weight.device)
        base = quantized_linear(weight, mode, compute_dtype, where, name)
        del weight
        setattr(parent, attr, QuantizedMergedLinear(layer, base) if isinstance(layer, MergedLinear) else base)
    model.quantize_mode = mode
    return model


# ----------------------------------------------------------------------------------------- loading
def _read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file in memory of its own: a short-lived map, so the file's pages
    are not kept resident (a model-long map would count the whole file in the process's RSS)."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).clone()


def _open_checkpoint(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], Callable[[str], torch.Tensor]]:
    """The checkpoint's tensors (for the key and shape check: meta tensors of a safetensors file's
    shapes) and a reader. Opened by checkpoint.open_weights, for its checks and one-line errors; a
    safetensors file is then read with one short-lived map per tensor instead of its file-long one."""
    path = find_weights(checkpoint_dir)
    names, read = open_weights(path)
    if path.suffix != ".safetensors":
        return {name: read(name) for name in names}, read  # a mapped .pth: no tensor is read yet
    with safe_open(str(path), framework="pt") as f:
        shapes = {name: torch.empty(f.get_slice(name).get_shape(), device="meta") for name in names}
    return shapes, partial(_read_tensor, path)


def load_quantized_lora_model(
    checkpoint_dir: Path | str, lora: LoRAConfig, mode: QuantizeMode, compute_dtype: torch.dtype,
    device: torch.device | str = "cpu", config: LLaMAConfig | None = None,
) -> LLaMA:
    """A LoRA model of `checkpoint_dir` whose frozen Block linears are quantized (`mode`), read tensor
    by tensor so that no full float copy of the model is ever held: peak memory is the quantized
    model plus one float layer. The embedding, head and norms are loaded in `compute_dtype`, the
    LoRA parameters are fresh fp32 ones (lora.py's initialisation), all on `device`. Strict: the
    checkpoint must hold exactly the base model's tensors."""
    check_mode(mode)
    import_bitsandbytes()  # the one-line install hint before anything is read
    checkpoint_dir = Path(checkpoint_dir)
    config = config or load_config(checkpoint_dir)
    device = torch.device(device)
    shapes, read = _open_checkpoint(checkpoint_dir)
    with torch.device("meta"):
        model = LLaMA(config)
    check_keys(model, shapes)
    frozen = {name for name, *_ in _frozen_linears(model)}
    rest = {k: read(k).to(device=device, dtype=compute_dtype) for k in shapes if k not in frozen}
    model.load_state_dict(rest, strict=False, assign=True)  # the Block linears stay on meta for now
    if config.tie_embeddings:
        model.tie_weights()
    del rest
    add_lora(model, lora)  # LoRA on the meta linears is created on meta: materialised next, in add_lora's order
    for layer in lora_layers(model):
        if layer.lora_A.is_meta:
            layer.reset_lora_parameters(device=device, dtype=torch.float32)
    quantize_frozen_base(model, mode, compute_dtype, device, weights=read)
    return model.eval()


# ----------------------------------------------------------------------------------------- merging
@dataclass
class Rounding:
    """How far the quantized base is from the float one: over every frozen Block weight w,
    max and mean of |w - dequant(quant(w))|, and how many weights that is."""

    mode: str
    max_abs: float
    mean_abs: float
    count: int

    def describe(self) -> str:
        return (f"the adapter was trained on a {self.mode}-quantized base, so it is applied to that base: "
                f"{self.count:,} frozen weights rounded as in training, |w - dequant(quant(w))| max {self.max_abs:.3g}, "
                f"mean {self.mean_abs:.3g}; merged in fp32")


@torch.no_grad()
def round_base_as_quantized_(model: LLaMA, mode: QuantizeMode) -> Rounding | None:
    """Replace every frozen Block weight of a float model (plain or with LoRA) by what training on a
    `mode`-quantized base computed with: dequant(quant(w)), quantized on CPU from the weight as it is
    stored, in fp32 (the weights become fp32 Parameters). None for mode "none"."""
    check_mode(mode)
    if mode == "none":
        return None
    largest, total, count = 0.0, 0.0, 0
    for name, parent, attr, layer in _frozen_linears(model):
        w = layer.weight
        rounded = dequantize(quantized_linear(w.detach().cpu(), mode, torch.float32, "cpu", name)).to(w.device)
        err = (w.float() - rounded).abs()
        largest, total, count = max(largest, float(err.max())), total + float(err.double().sum()), count + err.numel()
        layer.weight = nn.Parameter(rounded, requires_grad=False)
    return Rounding(mode, largest, total / count, count)


def match_training_base_(model: LLaMA, mode: QuantizeMode) -> None:
    """`round_base_as_quantized_`, saying on stderr what the rounding was."""
    rounding = round_base_as_quantized_(model, mode)
    if rounding is not None:
        print(rounding.describe(), file=sys.stderr)
