"""Decoding speed-ups over torch internals, kept apart from the plain loop in lit_llama/generation.py.

- CPU, eager: every bias-free nn.Linear replaced by a `PackedLinear` whose weight oneDNN laid out
  once in its blocked format (the default path re-packs it on every call).
- CPU, compiled: the one-token step through inductor, with one-row matmuls decomposed into fused
  reductions (`matvec_as_reduction`), which stream the weights at near memory speed.
- GPU, compiled: CUDA graphs ("reduce-overhead").
`packs_weights` says which applies; `prepare_decoding` does it and reports the time it took.
Figures: howto/performance.md.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch

from lit_llama.generation import check_fits_context, decode_one_token, generate
from lit_llama.model import LLaMA


def matvec_as_reduction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aten.mm for one row, (1, K) @ (K, N) -> (1, N), written as a product summed over K with fp32
    accumulation (as BLAS accumulates). Inductor turns it into one vectorized pass over the weight:
    on a 2-core CPU that streams 25-39 GB/s where the BLAS GEMV streams 13-20. Other shapes: no change."""
    if a.shape[0] != 1:
        return NotImplemented
    return (a.float().t() * b.float()).sum(0, keepdim=True).to(a.dtype)  # (K, 1) * (K, N) -> (1, N)


def inductor_with_matvec_reductions(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """torch.compile backend: inductor, with one-row matmuls decomposed by `matvec_as_reduction`."""
    # Imported here, not at the top: inductor pulls in dynamo (about 1 s), which eager generation never needs.
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), torch.ops.aten.mm.default: matvec_as_reduction}
    # Inductor would inline a matmul's pointwise input (RMSNorm's scaling, SwiGLU) into the reduction
    # and recompute it for each of the N output rows; storing every such intermediate instead (768
    # numbers a token) leaves one weight load per multiply-add: bf16 112 -> 125 tokens/s, and it rounds
    # them to the model's dtype as eager does.
    patches = {"realize_acc_reads_threshold": 0}
    # AOTAutograd's on-disk cache does not key on the decomposition table: without this, a graph
    # compiled earlier without it (same model, plain torch.compile) would be reused.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, decompositions=table, config_patches=patches)


@torch.library.custom_op("lit_llama::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(M, in) @ a oneDNN-packed (out, in) weight -> (M, out). A custom op so that torch.compile
    calls it as one opaque kernel: inductor cannot lower the packed weight itself."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class PackedLinear(torch.nn.Module):
    """Inference-only stand-in for a bias-free nn.Linear on CPU. oneDNN lays the weight out once in
    the blocked format its matmul kernels read; the default path re-packs it on every call, which
    dominates at decode's few rows (134M LLaMA, eager, 2 threads: bf16 batch 1 49 -> 60-68 tokens/s,
    batch 8 275 -> 396; fp32 batch 1 27 -> 41-49, batch 8 130 -> 254). The packed copy replaces the
    weight, so memory does not grow, but it is opaque: no state_dict or gradients; torch.compile
    sees one `packed_linear` call."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A plain attribute, not a parameter: it still answers .dtype and .device like the weight did.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(x.reshape(-1, self.in_features), self.weight)
        return y.view(*x.shape[:-1], self.out_features)  # (..., in) -> (..., out)


def can_pack_linear(weight: torch.Tensor) -> bool:
    """oneDNN packs fp32 CPU weights, and bf16 ones where the CPU has bf16 instructions."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packs_weights(device: torch.device | str, compile: bool, batch_size: int) -> bool:
    """Whether generation runs over packed weights: on CPU, the eager step always and the compiled one
    above batch 1 (134M bf16, batch 8: 396 eager / 366 compiled unpacked -> 528 compiled packed tokens/s).
    Compiled batch 1 is faster over the plain weights with `matvec_as_reduction` (130 vs 87)."""
    return torch.device(device).type == "cpu" and (not compile or batch_size > 1)


def pack_linear_weights(model: LLaMA) -> int:
    """Replace every plain bias-free nn.Linear of an inference model by a `PackedLinear`; returns how
    many. A head tied to the embedding stays as it is (packing it would keep a second copy)."""
    tied_head = model.lm_head.weight is model.transformer.wte.weight
    # Names, not modules: holding the old layers would keep their weights alive next to the packed copies.
    names = [
        name for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and module.bias is None and can_pack_linear(module.weight)
        and not (tied_head and name == "lm_head")
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, PackedLinear(getattr(parent, child)))
    return len(names)


def compile_decode_step(device: torch.device | str) -> Callable:
    """`decode_one_token` compiled once for a whole generation: the KV cache and the positions have
    static shapes, so one graph serves every token. On CPU batch-1 decoding is a chain of matrix-vector
    products that must stream every weight once per token; `matvec_as_reduction` streams them at near
    memory speed: 134M LLaMA, batch 1, 2 threads: bf16 44 -> 125-130 tokens/s, fp32 27 -> 63-93
    (howto/performance.md). On GPU: CUDA graphs ("reduce-overhead")."""
    if torch.device(device).type != "cpu":
        return torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    return torch.compile(decode_one_token, fullgraph=True, dynamic=False, backend=inductor_with_matvec_reductions)


def compiled_decode_for(model: LLaMA, batch_size: int, prompt_len: int, max_new_tokens: int) -> Callable:
    """`compile_decode_step`, compiled now rather than inside the first generation, so that a script can
    report compilation and generation times apart. Sizes the KV cache for batch_size rows of
    prompt_len + max_new_tokens and triggers the compilation with a two-token greedy run; a generation
    of that size (or smaller, with no padding) then reuses the cache and the graph."""
    check_fits_context(model, prompt_len, max_new_tokens)
    device = model.transformer.wte.weight.device  # the embedding is float also when the linear layers are quantized
    decode_fn = compile_decode_step(device)
    model.set_kv_cache(batch_size, prompt_len + max_new_tokens)
    generate(model, torch.zeros(batch_size, 1, dtype=torch.long, device=device), 2, temperature=0.0, decode_fn=decode_fn)
    return decode_fn


def pack_weights_timed(model: LLaMA) -> None:
    """`pack_linear_weights`, with the time it took printed as compilation time is."""
    t0 = time.perf_counter()
    if n_packed := pack_linear_weights(model):
        print(f"Packed {n_packed} linear layers for oneDNN in {time.perf_counter() - t0:.2f} s", file=sys.stderr)


def prepare_decoding(
    model: LLaMA, compile: bool, pack: bool, batch_size: int, prompt_len: int, max_new_tokens: int,
) -> Callable:
    """The decode step to generate with, eager or compiled here (its compilation time printed apart),
    after packing the weights for oneDNN if `pack` (what `packs_weights` said when the caller chose how
    to load them)."""
    if pack:
        pack_weights_timed(model)
    if not compile:
        return decode_one_token
    t0 = time.perf_counter()
    decode_fn = compiled_decode_for(model, batch_size, prompt_len, max_new_tokens)
    print(f"Compiled the decode step in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return decode_fn
