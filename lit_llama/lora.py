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
    merge_lora_weights(model)                                 # W += scaling * B A, for fast inference
    plain = merged_model(model)                               # a plain LLaMA to save or export
The adapter file (save, load, check against the base, apply) is lit_llama/adapter.py; conversion
to and from PEFT's format is lit_llama/peft_interop.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.checkpoint import load_into, load_model
from lit_llama.model import LLaMA, LLaMAConfig

LORA_SUFFIXES = ("lora_A", "lora_B")
TARGETS = ("query", "key", "value")  # the slices of c_attn, in row order
ALL_TARGETS = (*TARGETS, "projection", "mlp", "head", "embedding")
# Plain linear targets inside each block: target name -> module paths relative to the block.
BLOCK_TARGETS = {"projection": ("attn.c_proj",), "mlp": ("mlp.c_fc1", "mlp.c_fc2", "mlp.c_proj")}
FULL_MODULES = ("embedding", "head")  # what can be trained fully beside LoRA (PEFT's modules_to_save)


@dataclass
class LoRAConfig:
    """What LoRA adds to the model (flags --lora.NAME in finetune/lora.py; stored whole in the adapter).

    Args:
        r: Rank of the update B A; a positive integer.
        alpha: The update is scaled by alpha / r, so changing r needs no new learning rate; > 0.
        dropout: Dropout on the input of the LoRA path (the base path never sees it); in [0, 1).
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
        # One spelling per value (8 and 8.0 are one alpha), so that the stored JSON of equal configs is equal.
        self.alpha, self.dropout = float(self.alpha), float(self.dropout)
        if not _positive_int(self.r):
            raise ValueError(f"lora r must be a positive integer (the rank of the update), got {self.r!r}; try r=8")
        for name, on in zip(TARGETS, self.enable_lora):
            rank = getattr(self, f"r_{name}")
            if rank is not None and not _positive_int(rank):
                raise ValueError(f"lora r_{name} must be a positive integer or None (= r), got {rank!r}")
            if rank is not None and not on:
                raise ValueError(f"lora r_{name}={rank} is set but {name} is off; enable {name} or drop r_{name}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora alpha must be a positive number (the update is scaled by alpha / r), got {self.alpha}; try 16")
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
    def layout(self) -> tuple:
        """What decides the LoRA tensors' names and shapes and how they are scaled (dropout and which
        full modules train do not: an adapter applies to a model that differs only in those)."""
        return (self.r, float(self.alpha), self.target_names, self.slice_ranks, self.untie_embeddings,
                self.resize_vocab, self.pad_id)

    @property
    def train_modules(self) -> str:
        """The fully trained modules, e.g. "embedding,head" ("" for none)."""
        return ",".join(name for name in FULL_MODULES if getattr(self, f"train_{name}"))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W x, the frozen base layer's output (lit_llama/qlora.py computes it from a quantized W)."""
        return F.linear(x, self.weight)  # (B, T, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.frozen_forward(x)  # (B, T, out)
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
    config: LLaMAConfig | None = None,
) -> LLaMA:
    """Load a base checkpoint and add `lora` to it: base weights in `dtype` on `device`, LoRA
    freshly initialised there in `lora_dtype` (fp32 by default, also for a bf16 base). The
    checkpoint must hold exactly the base model's tensors: anything missing or extra is an error.
    `mmap`: as in `checkpoint.load_weights`; `config`: as in `checkpoint.load_model`."""
    model = load_model(checkpoint_dir, dtype=dtype, device=device, mmap=mmap, config=config)
    return add_lora(model, lora, lora_dtype=lora_dtype)
