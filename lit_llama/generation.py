"""Autoregressive generation over the KV cache, as small named steps:
logits_to_probs -> sample, prefill (the prompt in one forward), decode_one_token, generate.

A batch may hold prompts of different lengths: they are left-padded to a common length and the
padding slots are masked out of attention. RoPE only sees differences of positions, so shifting a
prompt right does not change its result (beyond float rounding).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from lit_llama.model import LLaMA


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from (B, V) logits; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.float().argmax(-1)  # CPU's argmax is 3x slower over bf16 than over fp32
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: LLaMA, idx: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Run the (B, T) prompt through the model, filling the KV cache; logits of the last position (B, V).
    Only that position goes through the head: the others' logits would be T - 1 wasted (C, V) matmuls."""
    input_pos = torch.arange(idx.size(1), device=idx.device)
    hidden = model(idx, input_pos, key_valid, return_hidden=True)  # (B, T, C)
    return model.lm_head(hidden[:, -1:])[:, -1]  # (B, V); heads see (B, T, C) as always


def decode_one_token(model: LLaMA, token: torch.Tensor, input_pos: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """One step: token (B, 1) at position input_pos (1,) -> logits (B, V)."""
    return model(token, input_pos, key_valid)[:, -1]


def matvec_as_reduction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aten.mm for one row, (1, K) @ (K, N) -> (1, N), written as a product summed over K with fp32
    accumulation (as BLAS accumulates). Inductor turns it into one vectorized pass over the weight:
    on a 2-core CPU that streams 25-39 GB/s where the BLAS GEMV streams 13-20. Other shapes: no change."""
    if a.shape[0] != 1:
        return NotImplemented
    return (a.float().t() * b.float()).sum(0, keepdim=True).to(a.dtype)  # (K, 1) * (K, N) -> (1, N)


def inductor_with_matvec_reductions(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """torch.compile backend: inductor, with one-row matmuls decomposed by `matvec_as_reduction`."""
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
    device = model.lm_head.weight.device
    decode_fn = compile_decode_step(device)
    model.set_kv_cache(batch_size, prompt_len + max_new_tokens)
    generate(model, torch.zeros(batch_size, 1, dtype=torch.long, device=device), 2, temperature=0.0, decode_fn=decode_fn)
    return decode_fn


def check_fits_context(model: LLaMA, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"{model.config.block_size}; shorten the prompt or lower max_new_tokens"
        )


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths right-aligned: ids (B, L) and the pad lengths (B,)."""
    longest = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=prompts[0].device)
    for row, p in enumerate(prompts):
        idx[row, longest - len(p):] = p
    pads = torch.tensor([longest - len(p) for p in prompts], device=idx.device)
    return idx, pads


@torch.inference_mode()
def generate(
    model: LLaMA,
    prompts: list[torch.Tensor] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    decode_fn: Callable = decode_one_token,
) -> list[torch.Tensor]:
    """Continue each prompt (1-D id tensors, any lengths) by up to `max_new_tokens` tokens.

    Returns one tensor per prompt: the prompt followed by its new tokens, stopping before EOS.
    `decode_fn` is the per-token step, so a caller can pass a compiled `decode_one_token`.
    """
    if isinstance(prompts, torch.Tensor):
        prompts = list(prompts) if prompts.dim() == 2 else [prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (encode with bos=True)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive number of tokens, got {top_k}")
    idx, pads = left_pad(prompts, pad_id)
    B, L = idx.shape
    check_fits_context(model, L, max_new_tokens)
    total = L + max_new_tokens
    cache = model.transformer.h[0].attn.kv_cache
    if cache is None or cache.k.shape[0] != B or cache.k.shape[2] < total:
        model.set_kv_cache(B, total)
    cache_len = model.transformer.h[0].attn.kv_cache.k.shape[2]
    slots = torch.arange(cache_len, device=idx.device)
    key_valid = (slots[None, :] >= pads[:, None]) if bool(pads.any()) else None  # (B, S)

    positions = torch.arange(L, total, device=idx.device)  # where each new token goes, made once
    new_tokens = torch.empty(B, max_new_tokens, dtype=torch.long, device=idx.device)
    # A row's length is max_new_tokens until it emits EOS; then it is the EOS position.
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=idx.device)
    n_new = 0
    eager = decode_fn is decode_one_token
    logits = prefill(model, idx, key_valid)
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        new_tokens[:, step] = token
        n_new = step + 1
        if eos_id is not None:
            lengths = torch.where((token == eos_id) & (lengths == max_new_tokens), step, lengths)
            if bool((lengths < max_new_tokens).all()):
                break
        if step + 1 < max_new_tokens:
            # Every step passes the same shapes and objects, so once the first has passed dynamo's
            # guards (compiling if needed) a compiled decode_fn need not re-check them: 0.35 -> 0.1 ms a
            # token. The eager step has no guards, and set_stance would import dynamo for it (about 1 s).
            with nullcontext() if eager else torch.compiler.set_stance("default", skip_guard_eval_unsafe=step > 0):
                logits = decode_fn(model, token[:, None], positions[step:step + 1], key_valid)
    return [torch.cat([p, new_tokens[row, : min(int(lengths[row]), n_new)]]) for row, p in enumerate(prompts)]
