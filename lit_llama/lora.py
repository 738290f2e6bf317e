"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): low-rank updates on frozen weights.

A frozen weight W gets a trainable low-rank update: y = W x + (alpha / r) * B (A x), with A (r, in)
and B (out, r). One of A, B starts at zero, so a fresh LoRA model computes exactly what its base does.

Targets (flags of `LoRAConfig`; howto/lora_targets.md has the full story):
    query, key, value   slices of the fused `attn.c_attn`, rows [Q (nh*hs) | K (ng*hs) | V (ng*hs)]
    projection          `attn.c_proj`
    mlp                 `mlp.c_fc1`, `mlp.c_fc2`, `mlp.c_proj`
    head                `lm_head`
    embedding           `transformer.wte` (A indexed by token id, as PEFT does)
Every target but the embedding is a `MergedLinear`. In c_attn each enabled slice s has its own A_s
and B_s (rank r_s, default r), stacked by rows so that lit-llama adapters load as they are:
    lora_A  (sum of enabled r_s, C)             [A_q; A_v]
    lora_B  (sum of enabled slice rows, max r_s) [B_q; B_v]   (7B, r=8: (16, 4096) and (8192, 8))
With different ranks, slice s uses the first r_s columns of its B rows; the rest stay zero.
Parameter names are the base layer's name plus `.lora_A` / `.lora_B` (`transformer.h.3.mlp.c_fc1.lora_A`,
`lm_head.lora_B`, `transformer.wte.lora_A`); the base weights keep their names, so base checkpoints
load into a LoRA model unchanged.

A tied model (embedding == head) stays tied: a LoRA on the embedding or the head is one shared update
held by the embedding (`TiedLoRAHead` reads it), and full training trains the one shared matrix.
`untie_embeddings=True` gives the head its own copy of the weight first, and then its own update.

The flow, every step explicit:
    lora = LoRAConfig(r=8); model = load_lora_model(checkpoint_dir, lora)   # base weights + fresh LoRA
    mark_only_lora_as_trainable(model)                        # ... train ...
    save_adapter(model, "out/lit_model.lora.safetensors", lora, prompt_style="alpaca")
    _, meta = load_adapter(path); model = load_lora_model(checkpoint_dir, meta.lora); apply_adapter(model, path)
    merge_lora_weights(model)                                 # W += scaling * B A, for fast inference
    plain = merged_model(model)                               # a plain LLaMA to save or export
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.checkpoint import atomic_path, load_into, load_model, save_weights
from lit_llama.model import LLaMA, LLaMAConfig

LORA_SUFFIXES = ("lora_A", "lora_B")
TARGETS = ("query", "key", "value")  # the slices of c_attn, in row order
ALL_TARGETS = (*TARGETS, "projection", "mlp", "head", "embedding")
# Plain linear targets inside each block: target name -> module paths relative to the block.
BLOCK_TARGETS = {"projection": ("attn.c_proj",), "mlp": ("mlp.c_fc1", "mlp.c_fc2", "mlp.c_proj")}
FULL_MODULES = ("embedding", "head")  # what can be trained fully beside LoRA (PEFT's modules_to_save)
EMBEDDING_LAYER_NAMES = ("transformer.wte.weight", "lm_head.weight", "transformer.wte.new_rows", "lm_head.new_rows")


@dataclass
class LoRAConfig:
    """What LoRA adds to the model (flags --lora_NAME in the scripts).

    Args:
        r: Rank of the update B A.
        alpha: The update is scaled by alpha / r, so changing r needs no new learning rate.
        dropout: Dropout on the input of the LoRA path (the base path never sees it).
        query: Adapt the query slice of the fused attention projection.
        key: Adapt the key slice.
        value: Adapt the value slice.
        projection: Adapt the attention output projection (attn.c_proj).
        mlp: Adapt the three MLP matrices (c_fc1, c_fc2, mlp.c_proj).
        head: Adapt the output head (lm_head); on a tied model this is the embedding's shared update.
        embedding: Adapt the token embedding (A indexed by token id); on a tied model the head follows.
        r_query: Rank of the query slice (None: r).
        r_key: Rank of the key slice (None: r).
        r_value: Rank of the value slice (None: r).
        train_embedding: Train the whole embedding matrix beside LoRA (PEFT's modules_to_save).
        train_head: Train the whole head matrix beside LoRA; on a tied model the same matrix as the embedding.
        untie_embeddings: On a tied model, give the head its own copy of the weight, then its own update.
        resize_vocab: Grow the embedding and head to this many tokens (new rows start at the mean embedding).
        pad_id: A new token whose row stays zero and is never updated (needs resize_vocab).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False
    head: bool = False
    embedding: bool = False
    r_query: int | None = None
    r_key: int | None = None
    r_value: int | None = None
    train_embedding: bool = False
    train_head: bool = False
    untie_embeddings: bool = False
    resize_vocab: int | None = None
    pad_id: int | None = None

    def __post_init__(self) -> None:
        if not _positive_int(self.r):
            raise ValueError(f"lora r must be a positive integer (the rank of the update), got {self.r!r}; try r=8")
        for name, on in zip(TARGETS, self.enable_lora):
            rank = getattr(self, f"r_{name}")
            if rank is not None and not _positive_int(rank):
                raise ValueError(f"lora r_{name} must be a positive integer or None (= r), got {rank!r}")
            if rank is not None and not on:
                raise ValueError(f"lora r_{name}={rank} is set but {name} is off; enable {name} or drop r_{name}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}; try 0.05 or 0.0")
        if not self.target_names and not self.train_embedding and not self.train_head:
            raise ValueError(
                "lora targets nothing: set at least one of query, key, value, projection, mlp, head, embedding to true"
            )
        if self.resize_vocab is not None and not _positive_int(self.resize_vocab):
            raise ValueError(f"lora resize_vocab must be a positive number of tokens, got {self.resize_vocab!r}")
        if self.pad_id is not None and self.resize_vocab is None:
            raise ValueError("lora pad_id names a new token's row: set resize_vocab too (the grown vocabulary size)")

    @property
    def enable_lora(self) -> tuple[bool, bool, bool]:
        return (self.query, self.key, self.value)

    @property
    def slice_ranks(self) -> tuple[int, int, int]:
        """The rank of each c_attn slice, Q, K, V (0 for a slice that is off)."""
        return tuple(
            (getattr(self, f"r_{name}") or self.r) if on else 0 for name, on in zip(TARGETS, self.enable_lora)
        )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(name for name in ALL_TARGETS if getattr(self, name))

    @property
    def targets(self) -> str:
        """The enabled targets, e.g. "query,value" (the adapter metadata's spelling)."""
        return ",".join(self.target_names)

    @property
    def train_modules(self) -> str:
        """The fully trained modules, e.g. "embedding,head" ("" for none)."""
        return ",".join(name for name in FULL_MODULES if getattr(self, f"train_{name}"))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _layout(lora: LoRAConfig) -> tuple:
    """What decides the LoRA tensors' names and shapes and how they are scaled (dropout and which
    full modules train do not: an adapter applies to a model that differs only in those)."""
    return (lora.r, float(lora.alpha), lora.target_names, lora.slice_ranks, lora.untie_embeddings,
            lora.resize_vocab, lora.pad_id)


# ------------------------------------------------------------------------------------------ layers
class MergedLinear(nn.Module):
    """A frozen linear layer (no bias) plus LoRA updates on some of its row slices.

    `slice_sizes` are the output rows of each slice (Q, K, V for c_attn; one slice for a plain
    linear); `enable_lora` says which are adapted; `r` is one rank for all or one per slice.
    `weight` has nn.Linear's layout (out, in) and name. The LoRA parameters are created in the
    default dtype (fp32) even for a bf16 weight: the forward casts between the two.
    """

    def __init__(
        self, in_features: int, slice_sizes: tuple[int, ...], r: int | tuple[int, ...], alpha: float,
        dropout: float = 0.0, enable_lora: tuple[bool, ...] = (True, False, True),
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        names: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        if len(slice_sizes) != len(enable_lora) or not any(enable_lora):
            raise ValueError(f"enable_lora {enable_lora} must have one flag per slice {slice_sizes}, at least one true")
        ranks = (r,) * len(slice_sizes) if isinstance(r, int) else tuple(r)
        if len(ranks) != len(slice_sizes):
            raise ValueError(f"ranks {ranks} must have one entry per slice {slice_sizes}")
        self.in_features = in_features
        self.out_features = sum(slice_sizes)
        self.slice_sizes = tuple(slice_sizes)
        self.enable_lora = tuple(enable_lora)
        self.names = names or (TARGETS if len(slice_sizes) == 3 else ("",) * len(slice_sizes))
        self.ranks = tuple(rank if on else 0 for rank, on in zip(ranks, enable_lora))  # 0: slice not adapted
        self.r = max(self.ranks)
        self.alpha = float(alpha)
        self.scaling = alpha / self.r  # every slice's scaling when the ranks are equal
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        lora_rows = sum(size for size, on in zip(slice_sizes, enable_lora) if on)
        self.lora_A = nn.Parameter(torch.empty(sum(self.ranks), in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(lora_rows, self.r, device=device))
        self.reset_lora_parameters()
        # One dropout for all slices (as in lit-llama; PEFT draws one mask per target module).
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

        # For each enabled slice: its rows in the output, in lora_A and in lora_B, its rank and scaling.
        self._lora_slices: list[tuple[slice, slice, slice, int, float]] = []
        out_start = a_start = b_start = 0
        for size, rank in zip(slice_sizes, self.ranks):
            if rank:
                self._lora_slices.append((
                    slice(out_start, out_start + size), slice(a_start, a_start + rank),
                    slice(b_start, b_start + size), rank, alpha / rank,
                ))
                a_start += rank
                b_start += size
            out_start += size

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, slice_sizes: tuple[int, ...], r: int | tuple[int, ...], alpha: float,
        dropout: float = 0.0, enable_lora: tuple[bool, ...] = (True, False, True),
        names: tuple[str, ...] | None = None, lora_dtype: torch.dtype | None = None,
    ) -> MergedLinear:
        """Wrap `linear`: its weight Parameter is reused (no copy, values kept); fresh LoRA
        parameters are created on its device, in `lora_dtype` (default: the default dtype, fp32)."""
        if getattr(linear, "bias", None) is not None:
            raise ValueError("MergedLinear has no bias; the LLaMA projections it wraps have none")
        with torch.device("meta"):  # nothing allocated for a weight we are about to replace
            layer = cls(linear.in_features, slice_sizes, r, alpha, dropout, enable_lora, names=names)
        layer.weight = linear.weight
        layer.reset_lora_parameters(device=linear.weight.device, dtype=lora_dtype or torch.get_default_dtype())
        return layer.train(linear.training)

    def reset_lora_parameters(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Initialise lora_A like nn.Linear (kaiming-uniform, a=sqrt(5)) and lora_B to zeros.
        With `device` or `dtype`, new Parameters are created there first (e.g. to materialise
        parameters left on the meta device); create the optimizer after this call."""
        if device is not None or dtype is not None:
            device, dtype = device or self.lora_A.device, dtype or self.lora_A.dtype
            self.lora_A = nn.Parameter(torch.empty(self.lora_A.shape, device=device, dtype=dtype))
            self.lora_B = nn.Parameter(torch.empty(self.lora_B.shape, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (B, T, out)
        if self.merged:
            return y
        # The LoRA path runs in the LoRA parameters' dtype (fp32 LoRA on a bf16 base keeps small
        # updates from rounding away); its result is cast back to the base output's dtype.
        after_A = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)  # (B, T, sum r_s)
        # Add each slice's update into its own columns of y, in place: no zero-padded (B, T, out)
        # update is built (lit-llama scattered into one: ~7x slower forward, see howto/lora.md).
        for out_rows, a_rows, b_rows, rank, scaling in self._lora_slices:
            update = (after_A[..., a_rows] @ self.lora_B[b_rows, :rank].T) * scaling  # (B, T, slice size)
            y[..., out_rows].add_(update.to(y.dtype))
        return y

    def delta_weights(self) -> list[tuple[slice, torch.Tensor]]:
        """Per enabled slice: its output rows and scaling_s * B_s @ A_s, computed in fp32."""
        return [
            (out_rows, (self.lora_B[b_rows, :rank].float() @ self.lora_A[a_rows].float()) * scaling)
            for out_rows, a_rows, b_rows, rank, scaling in self._lora_slices
        ]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole update as one product, fp32: delta (out, in) = B_full @ A_full, with A_full
        (sum r_s, in) = lora_A and B_full (out, sum r_s) holding scaling_s * B_s in slice s's rows and
        rank columns, zeros elsewhere. (What multi-adapter batches gather per row.)"""
        A = self.lora_A.detach().float()
        B = torch.zeros(self.out_features, A.shape[0], dtype=torch.float32, device=A.device)
        for out_rows, a_rows, b_rows, rank, scaling in self._lora_slices:
            B[out_rows, a_rows] = self.lora_B.detach()[b_rows, :rank].float() * scaling
        return A, B

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling * B A on each enabled slice (in fp32, cast back to W's dtype); the forward
        then skips the LoRA path. Merging a merged layer does nothing."""
        if not self.merged:
            for rows, delta in self.delta_weights():
                self.weight[rows] = (self.weight[rows].float() + delta).to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact up to one rounding to W's dtype per merge/unmerge)."""
        if self.merged:
            for rows, delta in self.delta_weights():
                self.weight[rows] = (self.weight[rows].float() - delta).to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        targets = ",".join(f"{name}:{rank}" if name else str(rank) for name, rank in zip(self.names, self.ranks) if rank)
        return (
            f"in_features={self.in_features}, slice_sizes={self.slice_sizes}, ranks={targets}, "
            f"alpha={self.alpha:g}, merged={self.merged}"
        )


class LoRAEmbedding(nn.Module):
    """A frozen token embedding plus a LoRA update, in PEFT's layout: lora_A (r, V) is indexed by
    token id (column t is token t's r-dim code) and lora_B (C, r) maps codes to embeddings, so
        y = W[idx] + scaling * A[:, idx]^T B^T        delta (V, C) = scaling * (B A)^T
    As in PEFT, A starts at zero and B normal(0, 1), and the lookup has no dropout.
    `weight` keeps nn.Embedding's name and layout (V, C)."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, r: int, alpha: float,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.r = r
        self.alpha = float(alpha)
        self.scaling = alpha / r
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight)  # nn.Embedding's default
        self.lora_A = nn.Parameter(torch.empty(r, num_embeddings, device=device))
        self.lora_B = nn.Parameter(torch.empty(embedding_dim, r, device=device))
        self.reset_lora_parameters()
        self.merged = False

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, r: int, alpha: float, lora_dtype: torch.dtype | None = None) -> LoRAEmbedding:
        """Wrap `embedding`: its weight Parameter is reused; fresh LoRA parameters on its device."""
        with torch.device("meta"):
            layer = cls(embedding.weight.shape[0], embedding.weight.shape[1], r, alpha)
        layer.weight = embedding.weight
        layer.reset_lora_parameters(device=embedding.weight.device, dtype=lora_dtype or torch.get_default_dtype())
        return layer.train(embedding.training)

    def reset_lora_parameters(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if device is not None or dtype is not None:
            device, dtype = device or self.lora_A.device, dtype or self.lora_A.dtype
            self.lora_A = nn.Parameter(torch.empty(self.lora_A.shape, device=device, dtype=dtype))
            self.lora_B = nn.Parameter(torch.empty(self.lora_B.shape, device=device, dtype=dtype))
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        y = F.embedding(idx, self.weight)  # (B, T, C)
        if self.merged:
            return y
        codes = F.embedding(idx, self.lora_A.T)  # (B, T, r)
        return y + (codes @ self.lora_B.T * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * (B A)^T, (V, C), in fp32."""
        return (self.lora_A.float().T @ self.lora_B.float().T) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """delta (V, C) = B_full @ A_full with B_full = A^T (V, r) and A_full = scaling * B^T (r, C), fp32."""
        return self.lora_B.detach().float().T * self.scaling, self.lora_A.detach().float().T

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, alpha={self.alpha:g}, merged={self.merged}"


class TiedLoRAHead(nn.Module):
    """The head of a tied model whose embedding carries LoRA. Its weight is the embedding's
    Parameter and its update the embedding's: logits = x (W + delta)^T with delta = scaling (B A)^T,
    computed as scaling * (x B) A, so the head and the embedding remain one matrix, before and
    after merging (PEFT's `ensure_weight_tying`). Dropout, when set, touches the LoRA path only."""

    def __init__(self, embedding: LoRAEmbedding, dropout: float = 0.0) -> None:
        super().__init__()
        self.weight = embedding.weight
        # A tuple, not an attribute: a registered submodule would list the embedding's LoRA
        # parameters twice in the state dict.
        self._embedding = (embedding,)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def embedding(self) -> LoRAEmbedding:
        return self._embedding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (B, T, V)
        emb = self.embedding
        if emb.merged:
            return y
        codes = self.lora_dropout(x).to(emb.lora_B.dtype) @ emb.lora_B  # (B, T, r)
        return y + ((codes @ emb.lora_A) * emb.scaling).to(y.dtype)  # (B, T, V)

    def extra_repr(self) -> str:
        return "tied to transformer.wte (weight and LoRA update)"


LoRALayer = MergedLinear | LoRAEmbedding


# ---------------------------------------------------------------------------------------- building
def is_tied(model: LLaMA) -> bool:
    """Do the head and the embedding share one weight Parameter?"""
    return model.lm_head.weight is model.transformer.wte.weight


def resize_token_embeddings(model: LLaMA, vocab_size: int, pad_id: int | None = None) -> None:
    """Grow the embedding (and the head) to `vocab_size` tokens, in place. The new tokens' rows
    (ids config.vocab_size .. vocab_size-1) start at the mean of the real tokens' rows, which keeps
    their logits and embeddings typical instead of random; `pad_id`'s row is zero. A tied model
    stays tied. `model.config` is not changed: it describes the base checkpoint."""
    config = model.config
    old = config.vocab_size
    if vocab_size <= old:
        raise ValueError(f"resize_vocab {vocab_size} must exceed the base vocabulary of {old} tokens (it only grows)")
    if pad_id is not None and not old <= pad_id < vocab_size:
        raise ValueError(f"pad_id {pad_id} must be one of the new tokens ({old}..{vocab_size - 1}): its row is kept at zero")
    rows = max(config.padded_vocab_size, vocab_size)

    def grow(w: torch.Tensor) -> nn.Parameter:
        new = torch.empty(rows, w.shape[1], dtype=w.dtype, device=w.device)  # (rows, C)
        new[: w.shape[0]] = w.detach()
        new[old:vocab_size] = w.detach()[:old].float().mean(0).to(w.dtype)
        if pad_id is not None:
            new[pad_id] = 0
        return nn.Parameter(new, requires_grad=w.requires_grad)

    tied = is_tied(model)
    model.transformer.wte.weight = grow(model.transformer.wte.weight)
    model.lm_head.weight = model.transformer.wte.weight if tied else grow(model.lm_head.weight)


def add_lora(model: LLaMA, lora: LoRAConfig, lora_dtype: torch.dtype | None = None) -> LLaMA:
    """Add `lora` to a plain LLaMA, in place (returns `model`): untie and resize the embeddings if
    asked, then wrap every target around its existing weight (no copy). LoRA parameters are created
    on the weights' device in `lora_dtype` (default fp32). The config is kept as `model.lora_config`."""
    if getattr(model, "lora_config", None) is not None or lora_layers(model):
        raise ValueError("this model already has LoRA layers; build it from a plain LLaMA")
    config = model.config
    if lora.untie_embeddings:
        if not is_tied(model):
            raise ValueError("untie_embeddings is for tied models (tie_embeddings=true); this base has a separate head")
        model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
    if lora.resize_vocab is not None:
        resize_token_embeddings(model, lora.resize_vocab, lora.pad_id)
    hs = config.head_size
    slice_sizes = (config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs)  # Q, K, V rows
    for block in model.transformer.h:
        if any(lora.enable_lora):
            block.attn.c_attn = MergedLinear.from_linear(
                block.attn.c_attn, slice_sizes, lora.slice_ranks, lora.alpha, lora.dropout, lora.enable_lora,
                lora_dtype=lora_dtype,
            )
        for target, paths in BLOCK_TARGETS.items():
            if getattr(lora, target):
                for path in paths:
                    parent_name, name = path.split(".")
                    parent = getattr(block, parent_name)
                    layer = getattr(parent, name)
                    setattr(parent, name, MergedLinear.from_linear(
                        layer, (layer.out_features,), lora.r, lora.alpha, lora.dropout, (True,), names=(target,),
                        lora_dtype=lora_dtype,
                    ))
    tied = is_tied(model)
    if lora.embedding or (tied and lora.head):
        model.transformer.wte = LoRAEmbedding.from_embedding(model.transformer.wte, lora.r, lora.alpha, lora_dtype)
        if tied:
            model.lm_head = TiedLoRAHead(model.transformer.wte, lora.dropout).train(model.lm_head.training)
    if lora.head and not tied:
        head = model.lm_head
        model.lm_head = MergedLinear.from_linear(  # rows from the weight: a resize leaves out_features stale
            head, (head.weight.shape[0],), lora.r, lora.alpha, lora.dropout, (True,), names=("head",), lora_dtype=lora_dtype,
        )
    model.lora_config = lora
    return model


def build_lora_model(config: LLaMAConfig, lora: LoRAConfig) -> LLaMA:
    """A LLaMA carrying `lora`. Works under `with torch.device("meta"):`."""
    return add_lora(LLaMA(config), lora)


def lora_layers(model: nn.Module) -> list[LoRALayer]:
    """Every layer that holds LoRA parameters (a tied head holds none: its embedding does)."""
    return [m for m in model.modules() if isinstance(m, (MergedLinear, LoRAEmbedding))]


def is_lora_key(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_SUFFIXES


def full_trained_parameters(model: LLaMA) -> dict[str, nn.Parameter]:
    """The embedding/head matrices trained in full beside LoRA, by checkpoint name. A tied model
    has one: `transformer.wte.weight`, which is also the head."""
    lora = getattr(model, "lora_config", None)
    if lora is None:
        return {}
    tied = is_tied(model)
    out = {}
    if lora.train_embedding or (tied and lora.train_head):
        out["transformer.wte.weight"] = model.transformer.wte.weight
    if lora.train_head and not tied:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def _frozen_row_targets(model: LLaMA) -> list[tuple[torch.Tensor, int]]:
    """(parameter, dim) pairs that hold one row or column per token: where the pad row lives."""
    out: list[tuple[torch.Tensor, int]] = [(p, 0) for p in full_trained_parameters(model).values()]
    if isinstance(model.transformer.wte, LoRAEmbedding):
        out.append((model.transformer.wte.lora_A, 1))  # (r, V): token t is column t
    if isinstance(model.lm_head, MergedLinear):
        out.append((model.lm_head.lora_B, 0))  # (V, r)
    return out


def mark_only_lora_as_trainable(model: LLaMA) -> None:
    """requires_grad only for lora_A/lora_B and the fully trained modules the LoRAConfig names;
    every other weight is frozen. With a pad_id, that token's row gets a zero gradient everywhere it
    has one, so it stays exactly zero (Adam's update of a zero gradient is zero, and so is weight
    decay of a zero row)."""
    full = {id(p) for p in full_trained_parameters(model).values()}
    for name, p in model.named_parameters():
        p.requires_grad = is_lora_key(name) or id(p) in full
    for handle in getattr(model, "_pad_row_hooks", []):
        handle.remove()
    model._pad_row_hooks = []
    lora = getattr(model, "lora_config", None)
    if lora is not None and lora.pad_id is not None:
        pad = lora.pad_id
        for p, dim in _frozen_row_targets(model):
            if p.requires_grad:
                model._pad_row_hooks.append(p.register_hook(lambda g, dim=dim: g.index_fill(dim, torch.tensor([pad], device=g.device), 0)))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, under their full names (`transformer.h.{i}.attn.c_attn.lora_A`)."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def lora_param_count(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if is_lora_key(name))


def reset_lora_parameters(model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
    """Re-initialise every layer's LoRA parameters (on `device`, in `dtype` when given)."""
    for layer in lora_layers(model):
        layer.reset_lora_parameters(device, dtype)


def merge_lora_weights(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (W += scaling * B A, in fp32): inference then
    costs what the base model costs. A tied model's shared update is folded once, into the one
    shared matrix. Undo with `unmerge_lora_weights`."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora_weights(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def output_config(config: LLaMAConfig, lora: LoRAConfig) -> LLaMAConfig:
    """The config of the merged model: untied and/or with a grown vocabulary when `lora` says so."""
    changes: dict[str, Any] = {}
    if lora.untie_embeddings:
        changes["tie_embeddings"] = False
    if lora.resize_vocab is not None:
        changes["vocab_size"] = lora.resize_vocab
        changes["padded_vocab_size"] = max(config.padded_vocab_size, lora.resize_vocab)
    return dataclasses.replace(config, **changes) if changes else config


def merged_model(model: LLaMA) -> LLaMA:
    """A plain LLaMA (no LoRA layers) with every update folded in: merges `model` first, then hands
    its tensors over by assignment (no copy). Its config is `output_config`: a tied model stays
    tied (save it and the head is the embedding, also in a Hugging Face export), an untied one
    gets its own lm_head, a grown vocabulary its new size. Save it with `save_checkpoint`."""
    lora = getattr(model, "lora_config", None)
    if lora is None:
        raise ValueError("the model has no LoRA config; build it with build_lora_model or load_lora_model")
    merge_lora_weights(model)
    config = output_config(model.config, lora)
    state_dict = {k: v for k, v in model.state_dict().items() if not is_lora_key(k)}
    if config.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    with torch.device("meta"):
        plain = LLaMA(config)
    load_into(plain, state_dict)
    return plain.eval()


def load_lora_model(
    checkpoint_dir: Path | str, lora: LoRAConfig, dtype: torch.dtype | None = None,
    device: torch.device | str | None = None, lora_dtype: torch.dtype = torch.float32, mmap: bool = True,
) -> LLaMA:
    """Load a base checkpoint and add `lora` to it: base weights in `dtype` on `device`, LoRA
    freshly initialised there in `lora_dtype` (fp32 by default, also for a bf16 base). The
    checkpoint must hold exactly the base model's tensors: anything missing or extra is an error.
    `mmap`: as in `checkpoint.load_weights`."""
    model = load_model(checkpoint_dir, dtype=dtype, device=device, mmap=mmap)
    return add_lora(model, lora, lora_dtype=lora_dtype)


# ----------------------------------------------------------------------------------------- adapters
# The config fields that decide the base weights' shapes: an adapter fits a base iff these match.
SHAPE_FIELDS = (
    "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "n_query_groups", "intermediate_size",
    "tie_embeddings",
)
ADAPTER_FORMAT = "lit_llama.lora.v2"  # v1 files (query/key/value only) read the same way
RAW_ALPHA = 16.0  # lit-llama's lora_alpha, assumed for its adapters (which store no metadata)
SaveEmbeddingLayers = Literal["auto", "true", "false"]


def base_shape(config: LLaMAConfig) -> dict[str, Any]:
    shape = {name: getattr(config, name) for name in SHAPE_FIELDS}
    if config.head_size != config.n_embd // config.n_head:
        # Recorded only when it is not n_embd // n_head, so fingerprints of older adapters still match.
        shape["head_size"] = config.head_size
    return shape


def base_fingerprint(config: LLaMAConfig) -> str:
    """sha256 of the JSON of the config's shape fields."""
    return hashlib.sha256(json.dumps(base_shape(config), sort_keys=True).encode()).hexdigest()


@dataclass
class AdapterMeta:
    """What an adapter file says about itself (None: not recorded, as in lit-llama adapters).
    `embedding_layers` names the non-LoRA tensors it carries (trained or grown embedding/head)."""

    lora: LoRAConfig
    prompt_style: str | None = None
    base_fingerprint: str | None = None
    base_config: dict[str, Any] | None = None
    embedding_layers: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()  # tokens added to the tokenizer, in id order (lit_llama/tokenizer.py)


def adapter_tensors(
    model: LLaMA, lora: LoRAConfig, save_embedding_layers: SaveEmbeddingLayers | bool = "auto"
) -> dict[str, torch.Tensor]:
    """What an adapter file holds: the LoRA tensors, plus embedding/head weights as asked.

    save_embedding_layers: "auto" saves a fully trained embedding/head whole, and of a grown but
    frozen one only its new rows (`transformer.wte.new_rows`, `lm_head.new_rows`): never a copy of a
    frozen base weight. "true" saves the embedding (and an untied head) whole in every case.
    "false" saves none; refused when they were trained, since the adapter would lose that training.
    """
    mode = str(save_embedding_layers).lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"save_embedding_layers must be auto, true or false, got {save_embedding_layers!r}")
    tensors = {k: v.detach().cpu() for k, v in lora_state_dict(model).items()}
    full = full_trained_parameters(model)
    tied = is_tied(model)
    if mode == "false":
        if full:
            raise ValueError(
                f"save_embedding_layers=false would drop the trained {', '.join(full)}; use auto (the default)"
            )
        return tensors
    if mode == "true":
        full = {"transformer.wte.weight": model.transformer.wte.weight}
        if not tied:
            full["lm_head.weight"] = model.lm_head.weight
    tensors.update({k: p.detach().cpu() for k, p in full.items()})
    if lora.resize_vocab is not None:  # the grown rows of a frozen embedding/head: only they are new
        new = slice(model.config.vocab_size, lora.resize_vocab)
        if "transformer.wte.weight" not in full:
            tensors["transformer.wte.new_rows"] = model.transformer.wte.weight.detach()[new].cpu()
        if not tied and "lm_head.weight" not in full:
            tensors["lm_head.new_rows"] = model.lm_head.weight.detach()[new].cpu()
    return tensors


def adapter_metadata(
    lora: LoRAConfig, base_config: LLaMAConfig, prompt_style: str | None = None, embedding_layers: tuple[str, ...] = (),
    special_tokens: Sequence[str] = (),
) -> dict[str, str]:
    """The strings an adapter file stores about itself (its safetensors header)."""
    ranks = {name: rank for name, rank in zip(TARGETS, lora.slice_ranks) if rank and rank != lora.r}
    return {
        "format": ADAPTER_FORMAT,
        "r": str(lora.r),
        "alpha": repr(float(lora.alpha)),
        "dropout": repr(float(lora.dropout)),
        "targets": lora.targets,
        "ranks": json.dumps(ranks, sort_keys=True) if ranks else "",
        "train_modules": lora.train_modules,
        "untie_embeddings": "true" if lora.untie_embeddings else "false",
        "resize_vocab": "" if lora.resize_vocab is None else str(lora.resize_vocab),
        "pad_id": "" if lora.pad_id is None else str(lora.pad_id),
        "embedding_layers": ",".join(embedding_layers),
        "special_tokens": json.dumps(list(special_tokens)) if special_tokens else "",
        "prompt_style": prompt_style or "",
        "base_fingerprint": base_fingerprint(base_config),
        "base_config": json.dumps(base_shape(base_config), sort_keys=True),
    }


def write_adapter(tensors: dict[str, torch.Tensor], path: Path | str, meta: dict[str, str]) -> Path:
    """Write adapter tensors and metadata strings atomically: .safetensors (metadata in its header)
    or .pth ({"lora": tensors, "meta": dict})."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"adapter path {str(path)!r} must end in .safetensors or .pth")
    if path.suffix == ".safetensors":
        save_weights(tensors, path, metadata=meta)
    else:
        with atomic_path(path) as tmp:
            torch.save({"lora": {k: v.contiguous() for k, v in tensors.items()}, "meta": meta}, tmp)
    return path


def save_adapter(
    model: LLaMA, path: Path | str, lora: LoRAConfig, base_config: LLaMAConfig | None = None,
    prompt_style: str | None = None, save_embedding_layers: SaveEmbeddingLayers | bool = "auto",
    special_tokens: Sequence[str] = (),
) -> Path:
    """Write what was trained (`adapter_tensors`) and what is needed to use it (r, alpha, dropout,
    targets, ranks, embedding options, prompt style, the base's fingerprint) to a .safetensors file
    (metadata in its header) or a .pth file ({"lora": tensors, "meta": dict}). `base_config`
    defaults to `model.config` (the base checkpoint's config, also after untying or resizing)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"adapter path {str(path)!r} must end in .safetensors or .pth")
    built = getattr(model, "lora_config", None)
    if built is None:
        raise ValueError("the model has no LoRA layers; build it with build_lora_model or load_lora_model")
    if _layout(built) != _layout(lora):
        raise ValueError(
            f"the model's LoRA layers do not match the LoRAConfig given (r={lora.r}, targets {lora.targets}); "
            "pass the config the model was built with"
        )
    tensors = adapter_tensors(model, lora, save_embedding_layers)
    embedding_layers = tuple(k for k in tensors if not is_lora_key(k))
    meta = adapter_metadata(lora, base_config or model.config, prompt_style, embedding_layers, special_tokens)
    return write_adapter(tensors, path, meta)


def _meta_from_strings(meta: dict[str, str], path: Path) -> AdapterMeta:
    try:
        targets = {t for t in meta["targets"].split(",") if t}
        unknown = targets - set(ALL_TARGETS)
        if unknown:
            raise ValueError(f"unknown targets {sorted(unknown)}")
        ranks = json.loads(meta["ranks"]) if meta.get("ranks") else {}
        train = {t for t in meta.get("train_modules", "").split(",") if t}
        lora = LoRAConfig(
            r=int(meta["r"]), alpha=float(meta["alpha"]), dropout=float(meta["dropout"]),
            **{name: name in targets for name in ALL_TARGETS},
            **{f"r_{name}": int(rank) for name, rank in ranks.items()},
            train_embedding="embedding" in train, train_head="head" in train,
            untie_embeddings=meta.get("untie_embeddings") == "true",
            resize_vocab=int(meta["resize_vocab"]) if meta.get("resize_vocab") else None,
            pad_id=int(meta["pad_id"]) if meta.get("pad_id") else None,
        )
        base_config = json.loads(meta["base_config"]) if meta.get("base_config") else None
        layers = tuple(k for k in meta.get("embedding_layers", "").split(",") if k)
        special = tuple(json.loads(meta["special_tokens"])) if meta.get("special_tokens") else ()
        if not all(isinstance(t, str) for t in special):
            raise TypeError("special_tokens is not a list of strings")
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path} has broken adapter metadata ({type(e).__name__}: {e}); save the adapter again") from None
    return AdapterMeta(lora, meta.get("prompt_style") or None, meta.get("base_fingerprint") or None, base_config, layers,
                       special)


def _raw_meta(state_dict: dict[str, torch.Tensor], path: Path) -> AdapterMeta:
    """lit-llama adapters are bare state dicts: r from lora_A's rows, assuming Q+V and alpha 16."""
    a_rows = {v.shape[0] for k, v in state_dict.items() if k.endswith("lora_A")}
    if len(a_rows) != 1 or next(iter(a_rows)) % 2:
        raise ValueError(f"{path} has no metadata and its lora_A shapes {sorted(a_rows)} are not lit-llama's Q+V layout")
    r = next(iter(a_rows)) // 2
    warnings.warn(
        f"{path} has no metadata (a lit-llama adapter?): assuming r={r} from lora_A's shape, "
        f"targets query,value and alpha={RAW_ALPHA:g}",
        stacklevel=3,
    )
    return AdapterMeta(LoRAConfig(r=r, alpha=RAW_ALPHA, query=True, key=False, value=True))


def read_adapter_file(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors and metadata strings of an adapter file, read safely (no checks)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist; pass the .lora.safetensors/.pth finetune wrote")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, "pt") as f:
                meta_strings = f.metadata() or None
            return load_file(path), meta_strings
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and set(obj) == {"lora", "meta"}:
            return obj["lora"], obj["meta"]
        return obj, None
    except Exception as e:  # a truncated file, a pickle with code in it, not an adapter at all
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise ValueError(
            f"cannot read adapter {path}: {type(e).__name__}: {detail}; the file is damaged or incomplete: "
            "copy it again or rerun finetune/lora.py"
        ) from None


def load_adapter(path: Path | str) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    """Read an adapter written by `save_adapter`, or a bare lit-llama LoRA state dict (with a warning)."""
    path = Path(path)
    state_dict, meta_strings = read_adapter_file(path)
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{path} holds no tensors; is it an adapter?")
    # Safetensors files from elsewhere may carry metadata of their own (e.g. {"format": "pt"}).
    ours = bool(meta_strings) and str(meta_strings.get("format", "")).startswith("lit_llama.lora")
    meta = _meta_from_strings(meta_strings, path) if ours else None
    declared = set(meta.embedding_layers) if meta else set()
    others = [k for k in state_dict if not is_lora_key(k) and k not in declared]
    if others:
        raise ValueError(f"{path} is not a LoRA adapter: it holds non-LoRA tensors such as {others[0]!r}")
    if meta is None:
        meta = _raw_meta(state_dict, path)
    return state_dict, meta


def _describe(shape: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def check_adapter_base(meta: AdapterMeta, config: LLaMAConfig, name: str) -> None:
    """A one-line error when the adapter was trained for another base than `config`."""
    if meta.base_fingerprint is not None and meta.base_fingerprint != base_fingerprint(config):
        ours = base_shape(config)
        theirs = meta.base_config or {}
        keys = list(dict.fromkeys([*ours, *theirs]))  # SHAPE_FIELDS, then head_size where either records it
        diff = [k for k in keys if theirs.get(k) != ours.get(k)] or list(SHAPE_FIELDS)
        raise ValueError(
            f"{name} was trained for another base model ({_describe({k: theirs.get(k) for k in diff})}), "
            f"not this one ({_describe({k: ours.get(k) for k in diff})}); load the base checkpoint it was finetuned from"
        )


def copy_adapter_(model: LLaMA, state_dict: dict[str, torch.Tensor], meta: AdapterMeta, name: str = "the adapter") -> None:
    """Copy adapter tensors into `model` (built with `meta.lora`), checking that every tensor fits."""
    check_adapter_base(meta, model.config, name)
    lora = meta.lora
    built = getattr(model, "lora_config", None)
    if built is None or _layout(built) != _layout(lora):
        raise ValueError(
            f"{name} needs a model with LoRA r={lora.r}, alpha={lora.alpha:g}, targets {lora.targets}; "
            "build it with load_lora_model(checkpoint_dir, meta.lora) from meta = load_adapter(path)[1]"
        )
    if any(layer.merged for layer in lora_layers(model)):
        raise ValueError("the model's LoRA weights are merged; call unmerge_lora_weights(model) before applying an adapter")
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set(lora_state_dict(model))
    given = {k for k in state_dict if is_lora_key(k)}
    if given != expected:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise ValueError(f"{name} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tied = is_tied(model)
    new = slice(model.config.vocab_size, lora.resize_vocab or model.config.vocab_size)
    targets: dict[str, torch.Tensor] = {k: params[k] for k in given}
    for k in state_dict.keys() - given:
        if k == "lm_head.weight" and tied:
            raise ValueError(f"{name} holds a separate lm_head.weight but the model's head is tied to its embedding")
        if k.endswith(".new_rows"):
            if lora.resize_vocab is None or (k == "lm_head.new_rows" and tied):
                raise ValueError(f"{name} holds {k} but the model has no such grown rows")
            targets[k] = (model.transformer.wte.weight if k.startswith("transformer") else model.lm_head.weight)[new]
        elif k in ("transformer.wte.weight", "lm_head.weight"):
            targets[k] = model.transformer.wte.weight if k.startswith("transformer") else model.lm_head.weight
        else:
            raise ValueError(f"{name} holds {k!r}, which is neither a LoRA tensor nor an embedding layer")
    with torch.no_grad():
        for k, target in targets.items():
            if target.shape != state_dict[k].shape:
                raise ValueError(
                    f"{name} does not fit the model: {k} is {tuple(state_dict[k].shape)}, the model has {tuple(target.shape)}"
                )
            target.copy_(state_dict[k])


def apply_adapter(model: LLaMA, path: Path | str) -> AdapterMeta:
    """Copy an adapter's tensors into `model`'s LoRA parameters (their dtype and device are kept),
    and any embedding/head weights it carries into the model's.

    The model must be the base the adapter was trained on (checked by fingerprint when the file
    has one) and be built with the adapter's LoRAConfig: `load_lora_model(dir, meta.lora)`."""
    path = Path(path)
    state_dict, meta = load_adapter(path)
    copy_adapter_(model, state_dict, meta, path.name)
    return meta


# ------------------------------------------------------------------------------------- PEFT interop
# PEFT (huggingface/peft) LoRA adapters for the LlamaForCausalLM that convert_lit_checkpoint.py
# writes. Module names come from convert_hf.LIT_TO_HF; PEFT prefixes them with "base_model.model."
# and stores Linear LoRA as `<module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r) and
# Embedding LoRA as `<module>.lora_embedding_A` (r, V) / `.lora_embedding_B` (C, r), our layouts.
PEFT_PREFIX = "base_model.model."
PEFT_SHORT_NAMES = {
    "query": ("q_proj",), "key": ("k_proj",), "value": ("v_proj",), "projection": ("o_proj",),
    "mlp": ("gate_proj", "up_proj", "down_proj"), "head": ("lm_head",), "embedding": ("embed_tokens",),
}
PEFT_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BLOCK_MODULES = {"attn.c_proj": "projection", "mlp.c_fc1": "mlp", "mlp.c_fc2": "mlp", "mlp.c_proj": "mlp"}


def _hf_module(lit_module: str) -> str:
    from lit_llama.convert_hf import hf_name_for

    return hf_name_for(lit_module + ".weight").removesuffix(".weight")


def _slice_layout(config: LLaMAConfig, lora: LoRAConfig) -> list[tuple[str, int, int, int, int, int]]:
    """Per enabled c_attn slice: (name, heads, rows, rank, first row in lora_A, first row in lora_B)."""
    hs = config.head_size
    heads = (config.n_head, config.n_query_groups, config.n_query_groups)
    out, a0, b0 = [], 0, 0
    for name, n, rank in zip(TARGETS, heads, lora.slice_ranks):
        if rank:
            out.append((name, n, n * hs, rank, a0, b0))
            a0, b0 = a0 + rank, b0 + n * hs
    return out


def lora_to_peft(
    state_dict: dict[str, torch.Tensor], lora: LoRAConfig, config: LLaMAConfig, base_model_name_or_path: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our adapter -> PEFT's (`adapter_model.safetensors` tensors, `adapter_config.json` dict) for
    the Hugging Face twin of the base `config`. c_attn's stacked A/B are split into q/k/v_proj, and
    B_q/B_k rows get HF's RoPE permutation (A is per input column, so it is not permuted). A tied
    shared update becomes an embed_tokens LoRA with `ensure_weight_tying`, which PEFT reads as
    lm_head.lora_A = B^T, lm_head.lora_B = A^T: the same head update ours applies."""
    from lit_llama.convert_hf import hf_names_for, meta_to_hf_rows

    if lora.resize_vocab is not None:
        raise ValueError(
            "this adapter grows the vocabulary, which a PEFT adapter cannot describe; merge it "
            "(scripts/merge_lora.py) and convert the merged checkpoint instead"
        )
    if not state_dict:
        raise ValueError("the adapter holds no tensors")
    tied = config.tie_embeddings and not lora.untie_embeddings
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        t = t.contiguous()
        module, kind = name.rsplit(".", 1)
        if module.endswith(".attn.c_attn"):
            hf_names = dict(zip(TARGETS, hf_names_for(f"{module}.weight")))  # q, k, v_proj
            for slice_name, heads, rows, rank, a0, b0 in _slice_layout(config, lora):
                hf = hf_names[slice_name].removesuffix(".weight")
                if kind == "lora_A":
                    out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = t[a0:a0 + rank].clone()
                else:
                    B = t[b0:b0 + rows, :rank]  # (rows, r_s)
                    if slice_name != "value":  # undo our interleaved-pair row order (RoPE)
                        B = meta_to_hf_rows(B, heads)
                    out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = B.contiguous().clone()
        elif module == "transformer.wte" and kind in LORA_SUFFIXES:
            emb = _hf_module(module)
            out[f"{PEFT_PREFIX}{emb}.lora_embedding_{kind[-1]}"] = t
            if tied:  # PEFT saves the tied head's (transposed) views too; written alike
                head_kind = "lora_A" if kind == "lora_B" else "lora_B"
                out[f"{PEFT_PREFIX}lm_head.{head_kind}.weight"] = t.T.contiguous()
        elif kind in LORA_SUFFIXES:
            out[f"{PEFT_PREFIX}{_hf_module(module)}.{kind}.weight"] = t
        elif name in ("transformer.wte.weight", "lm_head.weight"):
            out[f"{PEFT_PREFIX}{_hf_module(module)}.weight"] = t
            if tied:  # PEFT looks the tied head's modules_to_save copy up too
                out[f"{PEFT_PREFIX}lm_head.weight"] = t.clone()
        else:
            raise ValueError(f"{name} has no PEFT equivalent")
    target_modules = sorted({short for t in lora.target_names for short in PEFT_SHORT_NAMES[t]})
    if tied and lora.head:  # the shared update lives on the embedding
        target_modules = sorted((set(target_modules) - {"lm_head"}) | {"embed_tokens"})
    modules_to_save = sorted(
        {"embed_tokens"} if tied and lora.train_modules else
        {PEFT_SHORT_NAMES[m][0] for m in FULL_MODULES if getattr(lora, f"train_{m}")}
    )
    ranks = {PEFT_SHORT_NAMES[name][0]: rank for name, rank in zip(TARGETS, lora.slice_ranks) if rank and rank != lora.r}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        "rank_pattern": ranks,
        "alpha_pattern": {},
        "modules_to_save": modules_to_save or None,
        "ensure_weight_tying": bool(tied and ("embed_tokens" in target_modules or modules_to_save)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return out, adapter_config


def _peft_targets(adapter_config: dict[str, Any]) -> set[str]:
    targets = adapter_config.get("target_modules") or []
    if targets == "all-linear":
        return set(PEFT_ALL_LINEAR)
    if isinstance(targets, str):
        raise ValueError(
            f"target_modules is the regex {targets!r}; only a list of module names (or all-linear) can be converted"
        )
    return {t.rsplit(".", 1)[-1] for t in targets}


def peft_to_lora(
    tensors: dict[str, torch.Tensor], adapter_config: dict[str, Any], config: LLaMAConfig,
) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """A PEFT LoRA adapter of the Hugging Face twin of `config` -> our tensors and LoRAConfig
    (the inverse of `lora_to_peft`). Raises ValueError for what our LoRA cannot express exactly."""
    from lit_llama.convert_hf import LIT_TO_HF, hf_to_meta_rows

    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type is {adapter_config.get('peft_type')!r}; only LORA adapters can be converted")
    for flag, hint in (("use_dora", "DoRA"), ("use_rslora", "rank-stabilised scaling"), ("fan_in_fan_out", "fan_in_fan_out")):
        if adapter_config.get(flag):
            raise ValueError(f"the adapter uses {hint} ({flag}=true), which lit_llama's LoRA does not implement")
    if adapter_config.get("bias", "none") != "none":
        raise ValueError(f"the adapter trains biases (bias={adapter_config['bias']!r}); LLaMA's layers have none")
    if adapter_config.get("layers_to_transform") is not None:
        raise ValueError("the adapter covers only some layers (layers_to_transform); lit_llama's LoRA covers all")
    alpha = float(adapter_config.get("lora_alpha", 8))
    if any(float(a) != alpha for a in (adapter_config.get("alpha_pattern") or {}).values()):
        raise ValueError("the adapter has per-module alphas (alpha_pattern); lit_llama uses one alpha")
    targets = _peft_targets(adapter_config)
    unknown = targets - {s for names in PEFT_SHORT_NAMES.values() for s in names}
    if unknown:
        raise ValueError(f"target_modules {sorted(unknown)} have no lit_llama equivalent")
    mlp = {"gate_proj", "up_proj", "down_proj"} & targets
    if mlp and len(mlp) != 3:
        raise ValueError(f"the adapter adapts {sorted(mlp)} only; lit_llama's mlp target adapts gate_proj, up_proj and down_proj together")
    saved = {t.rsplit(".", 1)[-1] for t in adapter_config.get("modules_to_save") or []}
    if saved - {"embed_tokens", "lm_head"}:
        raise ValueError(f"modules_to_save {sorted(saved - {'embed_tokens', 'lm_head'})} cannot be converted (only embed_tokens, lm_head)")
    tie = bool(adapter_config.get("ensure_weight_tying")) and config.tie_embeddings
    if tie and "lm_head" in targets and "embed_tokens" not in targets:
        raise ValueError("a tied lm_head LoRA without an embed_tokens LoRA cannot be converted; target embed_tokens")
    untie = config.tie_embeddings and not tie and bool(("lm_head" in targets) or ("embed_tokens" in targets) or saved)

    # Strip PEFT's prefix, and the adapter name PEFT sometimes leaves in (".default").
    sd = {}
    for k, v in tensors.items():
        k = k.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default.", ".").replace(".default.", ".")
        if k.endswith(".base_layer.weight"):
            continue  # PEFT's copies of frozen base weights: we never carry them
        sd[k] = v
    hf_to_lit = {}
    for lit, hfs in LIT_TO_HF.items():
        for hf in hfs:
            hf_to_lit[hf.removesuffix(".weight")] = lit.removesuffix(".weight")

    def lit_module(hf_module: str) -> str:
        m = re.search(r"\.(\d+)\.", hf_module)
        key = hf_module if m is None else hf_module[: m.start()] + ".{i}." + hf_module[m.end():]
        if key not in hf_to_lit:
            raise ValueError(f"{hf_module} is not a LlamaForCausalLM module")
        return hf_to_lit[key].replace("{i}", m.group(1)) if m else hf_to_lit[key]

    r = int(adapter_config.get("r", 8))
    slice_ranks: dict[str, int] = {}
    for name in TARGETS:
        short = PEFT_SHORT_NAMES[name][0]
        if short in targets:
            shapes = {tuple(v.shape) for k, v in sd.items() if k.endswith(f".{short}.lora_A.weight")}
            if len(shapes) != 1:
                raise ValueError(f"{short}'s lora_A tensors are missing or differ in shape across layers: {sorted(shapes)}")
            slice_ranks[name] = next(iter(shapes))[0]
    lora = LoRAConfig(
        r=r, alpha=alpha, dropout=float(adapter_config.get("lora_dropout", 0.0)),
        query="q_proj" in targets, key="k_proj" in targets, value="v_proj" in targets,
        projection="o_proj" in targets, mlp=bool(mlp), head="lm_head" in targets and not tie,
        embedding="embed_tokens" in targets,
        **{f"r_{name}": rank for name, rank in slice_ranks.items() if rank != r},
        train_embedding="embed_tokens" in saved, train_head="lm_head" in saved and not tie,
        untie_embeddings=untie,
    )
    out: dict[str, torch.Tensor] = {}
    c_attn_parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.endswith((".lora_A.weight", ".lora_B.weight")):
            hf_module, kind = k.removesuffix(".weight").rsplit(".", 1)
            short = hf_module.rsplit(".", 1)[-1]
            if short in ("q_proj", "k_proj", "v_proj"):
                c_attn_parts.setdefault(hf_module.rsplit(".", 1)[0], {})[f"{short}.{kind}"] = v
                continue
            if short == "lm_head" and tie:
                continue  # the tied head's views of the embedding's factors, checked below
            if v.shape[0 if kind == "lora_A" else 1] != r:
                raise ValueError(f"{k} has rank {v.shape}; lit_llama gives {short} the common rank r={r}")
            out[f"{lit_module(hf_module)}.{kind}"] = v.contiguous()
        elif k.endswith((".lora_embedding_A", ".lora_embedding_B")):
            hf_module, kind = k.rsplit(".", 1)
            if v.shape[0 if kind.endswith("A") else 1] != r:
                raise ValueError(f"{k} has shape {tuple(v.shape)}; lit_llama gives embed_tokens the common rank r={r}")
            out[f"{lit_module(hf_module)}.lora_{kind[-1]}"] = v.contiguous()
        elif k == "lm_head.weight" and tie:
            embed = sd.get("model.embed_tokens.weight")
            if embed is None or not torch.equal(v, embed):
                raise ValueError("ensure_weight_tying is set but the saved lm_head differs from embed_tokens")
        elif k.endswith(".weight") and k.removesuffix(".weight").rsplit(".", 1)[-1] in saved:
            out[f"{lit_module(k.removesuffix('.weight'))}.weight"] = v.contiguous()
        else:
            raise ValueError(f"{k} is not a LoRA tensor this converter knows")
    if tie and "embed_tokens" in targets:
        A, B = out.get("transformer.wte.lora_A"), out.get("transformer.wte.lora_B")
        head_A, head_B = sd.get("lm_head.lora_A.weight"), sd.get("lm_head.lora_B.weight")
        if head_A is not None and (A is None or not torch.equal(head_A, B.T) or not torch.equal(head_B, A.T)):
            raise ValueError("ensure_weight_tying is set but lm_head's LoRA is not the transpose of embed_tokens'")
    hs = config.head_size
    for hf_attn, parts in c_attn_parts.items():
        layout = _slice_layout(config, lora)
        A = torch.cat([parts[f"{PEFT_SHORT_NAMES[name][0]}.lora_A"] for name, *_ in layout])  # (sum r_s, C)
        rows = sum(n * hs for _, n, *_ in layout)
        ref = parts[f"{PEFT_SHORT_NAMES[layout[0][0]][0]}.lora_B"]
        B = torch.zeros(rows, max(rank for *_, rank, _, _ in layout), dtype=ref.dtype)  # (sum rows, max r_s)
        for name, heads, n_rows, rank, _, b0 in layout:
            B_s = parts[f"{PEFT_SHORT_NAMES[name][0]}.lora_B"]  # (rows, r_s)
            if tuple(B_s.shape) != (n_rows, rank):
                raise ValueError(f"{hf_attn}.{PEFT_SHORT_NAMES[name][0]}.lora_B is {tuple(B_s.shape)}, expected {(n_rows, rank)}")
            B[b0:b0 + n_rows, :rank] = B_s if name == "value" else hf_to_meta_rows(B_s, heads)
        c_attn = lit_module(hf_attn + ".q_proj")  # transformer.h.{i}.attn.c_attn
        out[f"{c_attn}.lora_A"], out[f"{c_attn}.lora_B"] = A, B
    check_adapter_shapes(out, lora, config, "the PEFT adapter")
    return out, lora


def check_adapter_shapes(state_dict: dict[str, torch.Tensor], lora: LoRAConfig, config: LLaMAConfig, name: str) -> None:
    """A one-line error unless `state_dict` holds exactly the LoRA tensors a model of `config` with
    `lora` has, in their shapes (checked on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in lora_state_dict(build_lora_model(config, lora)).items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items() if is_lora_key(k)}
    if set(given) != set(expected):
        missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        raise ValueError(f"{name} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, shape in given.items():
        if shape != expected[k]:
            raise ValueError(f"{name} does not fit the model: {k} is {shape}, the model has {expected[k]}")
