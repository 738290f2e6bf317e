"""Weight-only quantized linear layers for generation, over PyTorch's own kernels.

Only the weights are quantized; activations, the KV cache, the norms and the embedding stay in the
model's float dtype, and every matmul accumulates in float:

- int8: per output channel, symmetric: w = q * scale, q in -127..127, scale = max|row| / 127.
  Kernel: `aten._weight_int8pack_mm(x, q[N, K], scales[N])` (CPU; CUDA since torch 2.6).
- int4: per group of `group_size` inputs of each output channel, asymmetric:
  w = (q - 8) * scale + zero, q in 0..15, scale = (max - min) / 15, zero = min + 8 * scale, so that
  q = 0 is the group's minimum and q = 15 its maximum. Kernels: `aten._weight_int4pack_mm_for_cpu`
  over `_convert_weight_to_int4pack_for_cpu` codes on CPU, `aten._weight_int4pack_mm` (tinygemm)
  over `_convert_weight_to_int4pack` codes on CUDA (bf16 only there). Both take the scales and zeros
  as one (K / group_size, N, 2) tensor in the activations' dtype.

The int4 layout is the one of llama.cpp's Q4_0 (w = d * (q - 8): scale d, zero 0) and Q4_1
(w = d * q + m: scale d, zero m + 8 d) blocks of 32, which is how a GGUF file's codes are packed
without a float round trip (lit_llama/gguf_model.py).

`quantize_for_generation` turns a loaded float model into a quantized one, one layer at a time.
The head is quantized to int8 in both modes (`head_mode`): a tied head (SmolLM2, Llama 3.2) gets
a quantized copy of the embedding, which stays float for the lookup. It is the largest matmul
(49152 x 576 for SmolLM2, 21% of the weights), so a float head would leave a fifth of each token's
weight traffic unquantized; and int4 there costs most of int4's quality (SmolLM2 perplexity, bf16
15.98: int4 blocks with an int4 head 16.97, with an int8 head 16.02; howto/quantize.md).
"""

from __future__ import annotations

from typing import Literal

import torch

from lit_llama.model import LLaMA

QuantizeMode = Literal["none", "int8", "int4"]
GROUP_SIZES = (32, 64, 128)
INT4_MIDPOINT = 8  # the kernels' code offset: w = (q - 8) * scale + zero


# ---------------------------------------------------------------------------------- quantizing
def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> int8 codes (N, K) and per-row scales (N,) in `dtype`, computed in fp32.
    The codes are rounded with the scale as stored in `dtype`, so that q * scale is the nearest
    representable value for each weight (an all-zero row gets scale 1)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).to(dtype)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> codes (N, K) int32 in 0..15, scales and zeros (N, K / group_size) in
    `dtype`; w ~ (q - 8) * scale + zero. Each group's minimum and maximum map onto codes 0 and 15."""
    check_group_size(group_size, weight.shape[1])
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)  # (N, groups, g)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scales = ((hi - lo) / 15).to(dtype)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # a constant group: q = 0 is exact
    zeros = (lo + INT4_MIDPOINT * scales.float()).to(dtype)
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None]) + INT4_MIDPOINT
    return q.clamp_(0, 15).to(torch.int32).reshape(N, K), scales, zeros


def check_group_size(group_size: int, in_features: int | None = None) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--group_size {group_size} is not supported; the int4 kernels take {', '.join(map(str, GROUP_SIZES))}")
    if in_features is not None and in_features % group_size:
        raise ValueError(f"a layer with {in_features} inputs cannot be split in groups of {group_size}; "
                         f"pass a --group_size that divides {in_features} ({', '.join(map(str, GROUP_SIZES))})")


# -------------------------------------------------------------------------------------- layers
class Int8Linear(torch.nn.Module):
    """A bias-free linear layer over int8 weights with one scale per output channel."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,), the activations' dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.q, self.scales)
        return y.view(*x.shape[:-1], self.out_features)  # (..., K) -> (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) int32 in 0..15 -> the layout the int4 kernel of q's device reads."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)  # (N, K/2) uint8
    # CUDA (tinygemm): two codes a byte, even k in the high nibble, then tiled for the tensor cores.
    # Not run in this project's tests (no GPU here); follows the op's contract in torch/_meta_registrations.py.
    N, K = q.shape
    if N % 8 or K % 32:
        raise ValueError(f"the CUDA int4 kernel needs a multiple of 8 outputs and of 32 inputs, got a {N} x {K} layer")
    inner_k_tiles = 8 if K % 128 == 0 else 4 if K % 64 == 0 else 2
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N, K/2)
    return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles)


class Int4Linear(torch.nn.Module):
    """A bias-free linear layer over 4-bit weights, groupwise: w = (q - 8) * scale + zero per group
    of `group_size` inputs. The codes are kept only in the kernel's packed layout."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        check_group_size(group_size, self.in_features)
        if scales.shape != (self.out_features, self.in_features // group_size) or zeros.shape != scales.shape:
            raise ValueError(f"int4 scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} do not match codes "
                             f"{tuple(q.shape)} in groups of {group_size}")
        self.group_size = group_size
        self.register_buffer("packed", pack_int4(q.to(torch.int32)))
        # (K / g, N, 2): the kernels' layout, scale then zero for each group of each output.
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.packed.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features)  # (..., K) -> (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"


QUANTIZED_LAYERS = (Int8Linear, Int4Linear)


# ------------------------------------------------------------------------------------ the model
def check_quantize(mode: QuantizeMode, group_size: int, dtype: torch.dtype, device: torch.device | str) -> None:
    """The one-line refusals, before anything is loaded."""
    if mode == "int4":
        check_group_size(group_size)
        if torch.device(device).type == "cuda" and dtype != torch.bfloat16:
            raise ValueError("--quantize int4 on CUDA runs in bf16 only (the tinygemm kernel); pass --precision bf16-true")
    if mode != "none" and dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("--quantize on CPU runs in 32-true or bf16-true")


def quantized_layer(weight: torch.Tensor, mode: QuantizeMode, group_size: int, dtype: torch.dtype) -> torch.nn.Module:
    """The `mode` layer for a bias-free linear layer's (out, in) float weight, on the weight's device."""
    if mode == "int8":
        return Int8Linear(*quantize_int8(weight, dtype))
    return Int4Linear(*quantize_int4(weight, group_size, dtype), group_size)


def head_mode(mode: QuantizeMode) -> QuantizeMode:
    """The head's quantization: int8 for int8 and int4 (see the module docstring)."""
    return "none" if mode == "none" else "int8"


def quantize_for_generation(model: LLaMA, mode: QuantizeMode, group_size: int = 32, dtype: torch.dtype | None = None) -> LLaMA:
    """Replace every nn.Linear of a float `model` by an `Int8Linear` or `Int4Linear` (`mode`, int4
    in groups of `group_size`; the head int8, `head_mode`), quantized from its weight as it is (load
    it in fp32 for the best codes), then cast what stays float (embedding, norms) to `dtype`
    (default: the model's). One layer at a time: a memory-mapped model never holds two float copies.
    A head tied to the embedding gets a quantized copy and the embedding stays float for the lookup.
    mode "none" only casts. Returns the model (changed in place) for generation only: no gradients,
    no state_dict to save."""
    dtype = dtype or model.transformer.wte.weight.dtype
    if mode != "none":
        check_quantize(mode, group_size, dtype, model.transformer.wte.weight.device)
        # Names, not modules: holding the old layers would keep their weights alive.
        names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
        for name in names:  # refused before anything changes
            if mode == "int4" and name != "lm_head":
                check_group_size(group_size, model.get_submodule(name).in_features)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            if linear.bias is not None:
                raise ValueError(f"{name} has a bias; weight-only quantization takes lit_llama's bias-free linear layers")
            layer_mode = head_mode(mode) if name == "lm_head" else mode
            setattr(parent, child, quantized_layer(linear.weight, layer_mode, group_size, dtype))
    return model.to(dtype)
