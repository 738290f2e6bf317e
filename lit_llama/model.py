"""The whole LLaMA model in one file.

Read it top to bottom: the config and its named presets, then the modules in the order data flows
through them: `LLaMA` -> `Block` -> `CausalSelfAttention` (with its `KVCache`) -> `MLP` -> `RMSNorm`
-> RoPE.

Shapes use one notation throughout:
    B  batch size                 T  tokens in this forward call
    S  KV-cache length            C  n_embd
    nh query heads                ng key/value heads (n_query_groups; GQA when ng < nh)
    hs head size (head_size; C // nh unless the config sets it)
    V  padded vocabulary size
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class LLaMAConfig:
    block_size: int = 2048
    """Longest sequence the model is built for (RoPE cache length, default KV-cache length)."""
    vocab_size: int = 32000
    """Tokenizer vocabulary size."""
    padded_vocab_size: int | None = None
    """Rows of the embedding and the head. Default: vocab_size rounded up to a multiple of 64,
    because matmuls with such sizes are faster; converters set it to the checkpoint's row count."""
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    head_size: int | None = None
    """Width of one attention head. Default: n_embd // n_head. Set it for models whose heads do not
    split n_embd (HF's head_dim): then Q is n_head * head_size wide, K and V n_query_groups * head_size,
    and the attention's output projection maps n_head * head_size back to n_embd."""
    n_query_groups: int | None = None
    """Key/value heads. n_head = multi-head, 1 = multi-query, in between = grouped-query attention."""
    intermediate_size: int | None = None
    """SwiGLU hidden size. Default: LLaMA's rule from multiple_of and ffn_dim_multiplier."""
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    """RoPE's theta: pair j of a head turns by base^(-2j/hs) radians per position."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE frequencies adjusted for contexts longer than the model was pretrained on (HF's rope_scaling).
    None: plain RoPE. {"type": "linear", "factor": f}: every frequency / f, so position p turns as p / f did.
    {"type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
    "original_max_position_embeddings": L} (Llama 3.1 and 3.2): pairs that made fewer than lo turns over
    the L pretraining tokens turn f times slower (past L they would reach angles never seen), pairs that
    made more than hi turns are kept (they have seen every angle), and those in between are interpolated."""
    tie_embeddings: bool = False
    """lm_head shares its weight with the token embedding (llama2.c models, TinyStories)."""
    source: str = field(default="", compare=False)
    """Where the numbers come from (documentation only)."""

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"model tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        for name in ("n_query_groups", "intermediate_size", "padded_vocab_size", "head_size", "multiple_of"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"model {name} must be a positive integer (or unset), got {value!r}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0) or not (math.isfinite(self.rope_base) and self.rope_base > 0):
            raise ValueError(f"model norm_eps and rope_base must be positive numbers, got {self.norm_eps} and {self.rope_base}")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = find_multiple(self.vocab_size, 64)
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.intermediate_size is None:
            # LLaMA's rule (Meta's FeedForward): 2/3 of 4*C keeps the parameter count of a
            # 4*C GELU MLP with three matrices instead of two, then round up to `multiple_of`.
            hidden = int(2 * 4 * self.n_embd / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.intermediate_size = find_multiple(hidden, self.multiple_of)
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or set head_size explicitly"
                )
            self.head_size = self.n_embd // self.n_head
        if self.head_size <= 0 or self.head_size % 2:
            raise ValueError(f"head_size ({self.head_size}) must be a positive even number: RoPE rotates pairs")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)  # our own copy: a shared preset dict stays untouched
            check_rope_scaling(self.rope_scaling)
        if self.n_head % self.n_query_groups:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_query_groups ({self.n_query_groups})"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"padded_vocab_size ({self.padded_vocab_size}) is smaller than vocab_size ({self.vocab_size})"
            )

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LLaMAConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: dict[str, Any]) -> None:
    """One-line ValueError unless `scaling` is a complete rope_scaling dict of a type we implement."""
    kind = scaling.get("type")
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; choose one of: {', '.join(ROPE_SCALING_KEYS)}")
    keys = ROPE_SCALING_KEYS[kind]
    missing = [k for k in keys if k not in scaling]
    extra = sorted(set(scaling) - {"type", *keys})
    if missing or extra:
        what = f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(extra)}"
        raise ValueError(f"rope_scaling of type {kind!r} {what}; it takes exactly: {', '.join(keys)}")
    bad = [k for k in keys if not isinstance(scaling[k], (int, float)) or isinstance(scaling[k], bool) or scaling[k] <= 0]
    if bad:
        raise ValueError(f"rope_scaling {', '.join(bad)} must be a positive number, got {scaling[bad[0]]!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(
            f"rope_scaling high_freq_factor ({scaling['high_freq_factor']}) must exceed low_freq_factor ({scaling['low_freq_factor']})"
        )


_META = "Meta params.json of the original release"
# Llama 3.1 and 3.2's rope_scaling (config.json, as in Meta's apply_scaling): pretrained on 8192 tokens.
_LLAMA31_ROPE = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}
PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA 1 (Touvron et al. 2023, Table 2); multiple_of 256 gives 11008/13824/17920/22016.
    "7B": dict(n_layer=32, n_head=32, n_embd=4096, norm_eps=1e-6, source=_META),
    "13B": dict(n_layer=40, n_head=40, n_embd=5120, norm_eps=1e-6, source=_META),
    "30B": dict(n_layer=60, n_head=52, n_embd=6656, norm_eps=1e-6, source=_META),
    "65B": dict(n_layer=80, n_head=64, n_embd=8192, norm_eps=1e-6, source=_META),
    # Llama 2 (meta-llama/Llama-2-*-hf config.json): 4096 context, 70B uses 8 KV heads.
    "Llama-2-7b": dict(block_size=4096, n_layer=32, n_head=32, n_embd=4096, source="meta-llama/Llama-2-7b-hf config.json"),
    "Llama-2-13b": dict(block_size=4096, n_layer=40, n_head=40, n_embd=5120, source="meta-llama/Llama-2-13b-hf config.json"),
    "Llama-2-70b": dict(
        block_size=4096, n_layer=80, n_head=64, n_embd=8192, n_query_groups=8, intermediate_size=28672,
        source="meta-llama/Llama-2-70b-hf config.json",
    ),
    # OpenLLaMA (openlm-research/open_llama_*  config.json).
    "open_llama_3b": dict(
        n_layer=26, n_head=32, n_embd=3200, intermediate_size=8640, norm_eps=1e-6,
        source="openlm-research/open_llama_3b config.json",
    ),
    "open_llama_7b": dict(n_layer=32, n_head=32, n_embd=4096, norm_eps=1e-6, source="openlm-research/open_llama_7b config.json"),
    "open_llama_13b": dict(n_layer=40, n_head=40, n_embd=5120, norm_eps=1e-6, source="openlm-research/open_llama_13b config.json"),
    # TinyLlama (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json).
    "TinyLlama-1.1B": dict(
        n_layer=22, n_head=32, n_embd=2048, n_query_groups=4, intermediate_size=5632,
        source="TinyLlama/TinyLlama-1.1B config.json",
    ),
    # Llama 3 (meta-llama/* config.json): 128256-token vocabulary, 8 KV heads, rope_theta 500000.
    # 3.1 and 3.2 stretch the 8192-token pretraining context to 131072 with llama3 RoPE scaling.
    "Llama-3-8B": dict(
        block_size=8192, vocab_size=128256, n_layer=32, n_head=32, n_embd=4096, n_query_groups=8,
        intermediate_size=14336, rope_base=500000.0, source="meta-llama/Meta-Llama-3-8B config.json",
    ),
    "Llama-3.1-8B": dict(
        block_size=131072, vocab_size=128256, n_layer=32, n_head=32, n_embd=4096, n_query_groups=8,
        intermediate_size=14336, rope_base=500000.0, rope_scaling=_LLAMA31_ROPE,
        source="meta-llama/Llama-3.1-8B config.json",
    ),
    "Llama-3.1-70B": dict(
        block_size=131072, vocab_size=128256, n_layer=80, n_head=64, n_embd=8192, n_query_groups=8,
        intermediate_size=28672, rope_base=500000.0, rope_scaling=_LLAMA31_ROPE,
        source="meta-llama/Llama-3.1-70B config.json",
    ),
    "Llama-3.2-1B": dict(
        block_size=131072, vocab_size=128256, n_layer=16, n_head=32, n_embd=2048, n_query_groups=8,
        intermediate_size=8192, rope_base=500000.0, rope_scaling=_LLAMA32_ROPE, tie_embeddings=True,
        source="meta-llama/Llama-3.2-1B config.json (head_dim 64)",
    ),
    "Llama-3.2-3B": dict(
        block_size=131072, vocab_size=128256, n_layer=28, n_head=24, n_embd=3072, n_query_groups=8,
        intermediate_size=8192, rope_base=500000.0, rope_scaling=_LLAMA32_ROPE, tie_embeddings=True,
        source="meta-llama/Llama-3.2-3B config.json (head_dim 128)",
    ),
    # SmolLM2 (HuggingFaceTB/SmolLM2-* config.json): LlamaForCausalLM, 49152-token vocabulary, tied
    # head, 8192 context. The 1.7B model's context was extended from 2048 with rope_theta 130000.
    "SmolLM2-135M": dict(
        block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_embd=576, n_query_groups=3,
        intermediate_size=1536, rope_base=100000.0, tie_embeddings=True,
        source="HuggingFaceTB/SmolLM2-135M config.json",
    ),
    "SmolLM2-360M": dict(
        block_size=8192, vocab_size=49152, n_layer=32, n_head=15, n_embd=960, n_query_groups=5,
        intermediate_size=2560, rope_base=100000.0, tie_embeddings=True,
        source="HuggingFaceTB/SmolLM2-360M config.json",
    ),
    "SmolLM2-1.7B": dict(
        block_size=8192, vocab_size=49152, n_layer=24, n_head=32, n_embd=2048, n_query_groups=32,
        intermediate_size=8192, rope_base=130000.0, tie_embeddings=True,
        source="HuggingFaceTB/SmolLM2-1.7B config.json",
    ),
    # Karpathy's llama2.c TinyStories models (README model table; multiple_of=32, tied head).
    "stories260K": dict(
        block_size=512, vocab_size=512, n_layer=5, n_head=8, n_embd=64, n_query_groups=4,
        intermediate_size=172, tie_embeddings=True, source="llama2.c doc/stories260K.md",
    ),
    "stories15M": dict(
        block_size=256, n_layer=6, n_head=6, n_embd=288, multiple_of=32, tie_embeddings=True,
        source="llama2.c README (dim 288, 6 layers, 6 heads)",
    ),
    "stories42M": dict(
        block_size=1024, n_layer=8, n_head=8, n_embd=512, multiple_of=32, tie_embeddings=True,
        source="llama2.c README (dim 512, 8 layers, 8 heads)",
    ),
    "stories110M": dict(
        block_size=1024, n_layer=12, n_head=12, n_embd=768, multiple_of=32, tie_embeddings=True,
        source="llama2.c README (dim 768, 12 layers, 12 heads)",
    ),
    # Tiny presets for tests and the quickstart: small enough to train on a laptop CPU.
    "tiny": dict(block_size=128, vocab_size=256, n_layer=2, n_head=4, n_embd=32, multiple_of=16, source="tests"),
    "tiny-gqa": dict(
        block_size=128, vocab_size=256, n_layer=2, n_head=4, n_embd=32, n_query_groups=2, multiple_of=16,
        source="tests",
    ),
    "tiny-tied": dict(
        block_size=128, vocab_size=256, n_layer=2, n_head=4, n_embd=32, n_query_groups=1, multiple_of=16,
        tie_embeddings=True, source="tests",
    ),
}


class LLaMA(nn.Module):
    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=RMSNorm(config.n_embd, eps=config.norm_eps),
            )
        )
        if config.tie_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head use the token embedding's Parameter (one tensor, one gradient)."""
        self.lm_head.weight = self.transformer.wte.weight

    def set_kv_cache(
        self, batch_size: int, max_seq_length: int | None = None, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Preallocate a key/value cache in every block for `batch_size` sequences of up to
        `max_seq_length` tokens (default: block_size). Replaces any previous cache."""
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(
                f"max_seq_length {max_seq_length} exceeds the model's block_size {self.config.block_size}"
            )
        weight = self.transformer.wte.weight  # float also when the linear layers are quantized
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(
                batch_size, max_seq_length, self.config.n_query_groups, self.config.head_size,
                device=device or weight.device, dtype=dtype or weight.dtype,
            )

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def forward(
        self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids `idx` (B, T).

        Without `input_pos` this is a plain causal forward over positions 0..T-1 (training).
        With `input_pos` (T,) the tokens sit at those positions and attend through the KV cache
        (set it with `set_kv_cache`). `key_valid` (B, S), optional, marks which cache slots hold real
        tokens, so that left-padded prompts of different lengths can share one batch.
        `return_hidden=True` returns the final normed hidden states (B, T, C) instead, for callers
        that need the logits of only some positions (a prompt's last token, the unmasked labels):
        the head is a (C, V) matmul, the largest of the model, so they apply `lm_head` themselves.
        """
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
            positions = torch.arange(T, device=idx.device)
            mask = None
        else:
            kv_cache = self.transformer.h[0].attn.kv_cache
            if kv_cache is None:
                raise RuntimeError("forward with input_pos needs a KV cache: call model.set_kv_cache(...) first")
            if kv_cache.k.shape[0] != B:
                raise ValueError(f"batch of {B} does not match the KV cache's batch size {kv_cache.k.shape[0]}")
            positions = input_pos
            mask = build_cache_mask(input_pos, kv_cache.k.shape[2], key_valid)  # (B or 1, 1, T, S)
        cos, sin = rope_angles(positions, self.config.head_size, self.config.rope_base, self.config.rope_scaling)
        # cos, sin: (T, hs/2) each
        cos, sin = cos[:, None], sin[:, None]  # (T, 1, hs/2): the same rotation for every head

        x = self.transformer.wte(idx)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cos, sin, input_pos, mask)
        x = self.transformer.ln_f(x)
        return x if return_hidden else self.lm_head(x)  # (B, T, C) or (B, T, V)


def build_cache_mask(input_pos: torch.Tensor, cache_len: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Boolean attention mask (True = attend) for queries at `input_pos` over `cache_len` slots."""
    # The check reads a value from the tensor; a compiled decode step skips it (generate checks once).
    if not torch.compiler.is_compiling() and input_pos.max() >= cache_len:
        raise ValueError(
            f"position {int(input_pos.max())} does not fit the KV cache of {cache_len} tokens; "
            "use a shorter prompt, fewer new tokens or a larger max_seq_length"
        )
    slots = torch.arange(cache_len, device=input_pos.device)
    causal = slots[None, :] <= input_pos[:, None]  # (T, S)
    if key_valid is None:
        return causal[None, None]  # (1, 1, T, S)
    # A padding query sees itself, so its attention row is never empty (an empty row gives NaN,
    # which would leak into later layers through the padding slot's keys and values).
    own_slot = slots[None, :] == input_pos[:, None]  # (T, S)
    return causal[None, None] & (key_valid[:, None, None, :] | own_slot)  # (B, 1, T, S)


class Block(nn.Module):
    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.rms_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.rms_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, input_pos=None, mask=None) -> torch.Tensor:
        x = x + self.attn(self.rms_1(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.rms_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_query_groups = config.n_query_groups
        self.head_size = config.head_size
        # One fused projection whose output is laid out [Q (nh*hs) | K (ng*hs) | V (ng*hs)].
        qkv_size = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.c_attn = nn.Linear(config.n_embd, qkv_size, bias=False)
        # The heads' outputs side by side (nh*hs, which is C unless head_size is set) back to C.
        self.c_proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos=None, mask=None) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, C)
        nh, ng, hs = self.n_head, self.n_query_groups, self.head_size
        qk, v = self.c_attn(x).split(((nh + ng) * hs, ng * hs), dim=-1)
        # Queries and keys get the same rotation: one RoPE call for both launches half the kernels.
        q, k = apply_rope(qk.view(B, T, nh + ng, hs), cos, sin).split((nh, ng), dim=2)  # (B, T, nh/ng, hs)
        q = q.transpose(1, 2)  # (B, nh, T, hs)
        k = k.transpose(1, 2)  # (B, ng, T, hs)
        v = v.view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, ng, S, hs)
        # Query head h reads key/value head h // (nh // ng), as in Meta's and HF's repeat_kv.
        if T == 1 and mask is not None:
            y = attend_one_query(q, k, v, mask)  # (B, nh, 1, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=ng != nh
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh*hs)
        return self.c_proj(y)


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per sequence over the cache, as a plain matmul-softmax (HF's eager
    order of roundings). At this shape CPU's flash kernel is slower: in bf16, 2x at batch 1 and 6x at
    batch 8 (howto/performance.md). q (B, nh, 1, hs); k, v (B, ng, S, hs); mask (B or 1, 1, 1, S).
    The nh/ng query heads that share a key/value head become the query rows of its matmul: GQA
    without repeating k and v."""
    B, nh, _, hs = q.shape
    ng = k.shape[1]
    scores = (q.view(B, ng, nh // ng, hs) @ k.transpose(-1, -2)) * hs**-0.5  # (B, ng, nh/ng, S)
    probs = scores.masked_fill(~mask, float("-inf")).float().softmax(-1).to(v.dtype)
    return (probs @ v).view(B, nh, 1, hs)  # (B, ng, nh/ng, hs) -> (B, nh, 1, hs)


class KVCache(nn.Module):
    """Preallocated keys and values; `update` writes the new positions in place and returns the
    whole cache. Static shapes, so a compiled decode step is reused for every token."""

    def __init__(self, batch_size, max_seq_length, n_query_groups, head_size, device=None, dtype=None) -> None:
        super().__init__()
        shape = (batch_size, n_query_groups, max_seq_length, head_size)  # (B, ng, S, hs)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class MLP(nn.Module):
    """SwiGLU: c_proj(silu(c_fc1(x)) * c_fc2(x)); Meta's w1, w3, w2."""

    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.c_fc1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.c_fc2 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.silu(self.c_fc1(x)) * self.c_fc2(x))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 whatever the input dtype (as Meta and HF)."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise (the fused kernel accumulates in fp32 for bf16/fp16 input), round to x's dtype, then
        # scale: HF's order of roundings, bit for bit, without a saved fp32 copy of x for the backward.
        return F.rms_norm(x, (x.size(-1),), eps=self.eps) * self.weight


def rope_frequencies(
    head_size: int, base: float = 10000.0, scaling: dict[str, Any] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """inv_freq[j] = base^(-2j/hs), the radians pair j turns per position, (hs/2,) fp32, adjusted by
    `scaling` (see LLaMAConfig.rope_scaling); the same numbers as transformers' ROPE_INIT_FUNCTIONS."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["type"] == "linear":
        return inv_freq / factor  # angle of p / factor: f*L positions span the angles L did in pretraining
    # llama3. How many whole turns pair j makes over the pretraining context decides its fate:
    # fewer than low_freq_factor -> slowed down by factor (smooth = 0), more than high_freq_factor ->
    # unchanged (smooth = 1), in between -> linear in that turn count.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq  # (hs/2,) tokens per turn
    turns = scaling["original_max_position_embeddings"] / wavelen
    smooth = ((turns - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_angles(
    positions: torch.Tensor, head_size: int, base: float = 10000.0, scaling: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle[p, j] = p * inv_freq[j] (`rope_frequencies`) for the given positions: each
    (T, hs/2), fp32. Computed per forward (a few tiny kernels) rather than cached: no state to keep on
    the right device or out of a bf16 cast, and nothing for torch.compile to guard on."""
    inv_freq = rope_frequencies(head_size, base, scaling, positions.device)  # (hs/2,)
    angles = torch.outer(positions.float(), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of each head by angle[p, j] (Meta's convention).

    `cos`/`sin` hold angle[p, j] shaped to broadcast against x's pairs: (T, hs/2) for x (B, nh, T, hs),
    (T, 1, hs/2) for x (B, T, nh, hs). Computed in fp32 whatever x's dtype.
    HF checkpoints store q/k rows permuted to rotate (x[j], x[j + hs/2]) instead; the converters
    undo that permutation so this single convention serves every format.
    """
    if torch.compiler.is_compiling():  # inductor fuses these into one kernel, but cannot generate complex code
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (..., hs/2)
        rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (..., hs/2, 2)
    else:  # eager: the same rotation as one complex multiply, a third of the time forward and backward
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (..., hs/2)
        rotated = torch.view_as_real(pairs * torch.complex(cos, sin))  # (..., hs/2, 2)
    return rotated.flatten(-2).type_as(x)  # (..., hs)


def init_weights(model: LLaMA, std: float = 0.02) -> None:
    """GPT-2 style init for training from scratch: normal(0, std) for linears and embeddings, with
    the residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream does not grow with depth."""
    for name, p in model.named_parameters():
        if name.endswith("rms_1.weight") or name.endswith("rms_2.weight") or name.endswith("ln_f.weight"):
            nn.init.ones_(p)
        elif name.endswith("c_proj.weight"):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * model.config.n_layer))
        else:
            nn.init.normal_(p, 0.0, std)
