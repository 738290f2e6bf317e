"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) for the fused attention projection.

A frozen weight W gets a trainable low-rank update: y = W x + (alpha / r) * B (A x), with A (r, in)
and B (out, r). B starts at zero, so a fresh LoRA model computes exactly what its base does.

Here LoRA targets `attn.c_attn`, whose output rows are [Q (nh*hs) | K (ng*hs) | V (ng*hs)]. Each
enabled slice s (default Q and V, as in the paper and the original lit-llama) has its own A_s and
B_s, stored stacked by rows so that lit-llama adapters load as they are:
    lora_A  (r * n_enabled, C)            [A_q; A_v]
    lora_B  (sum of enabled sizes, r)     [B_q; B_v]   (7B, r=8: (16, 4096) and (8192, 8))
Parameter names are `transformer.h.{i}.attn.c_attn.{weight,lora_A,lora_B}`: the base weight keeps
its name, so base checkpoints load into a LoRA model unchanged.

The flow, every step explicit:
    lora = LoRAConfig(r=8); model = load_lora_model(checkpoint_dir, lora)   # base weights + fresh LoRA
    mark_only_lora_as_trainable(model)                        # ... train ...
    save_adapter(model, "out/lit_model.lora.safetensors", lora, prompt_style="alpaca")
    _, meta = load_adapter(path); model = load_lora_model(checkpoint_dir, meta.lora); apply_adapter(model, path)
    merge_lora_weights(model)                                 # W += scaling * B A, for fast inference
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.checkpoint import atomic_path, load_config, load_model, save_weights
from lit_llama.model import LLaMA, LLaMAConfig

LORA_SUFFIXES = ("lora_A", "lora_B")
TARGETS = ("query", "key", "value")  # the slices of c_attn, in row order


@dataclass
class LoRAConfig:
    """What LoRA adds to each attention block (flags --lora.NAME).

    Args:
        r: Rank of the update B A.
        alpha: The update is scaled by alpha / r, so changing r needs no new learning rate.
        dropout: Dropout on the input of the LoRA path (the base path never sees it).
        query: Adapt the query slice of the fused projection.
        key: Adapt the key slice.
        value: Adapt the value slice.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    query: bool = True
    key: bool = False
    value: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora r must be a positive integer (the rank of the update), got {self.r!r}; try r=8")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}; try 0.05 or 0.0")
        if not any(self.enable_lora):
            raise ValueError("lora targets nothing: set at least one of query, key, value to true")

    @property
    def enable_lora(self) -> tuple[bool, bool, bool]:
        return (self.query, self.key, self.value)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def targets(self) -> str:
        """The enabled slices, e.g. "query,value" (the adapter metadata's spelling)."""
        return ",".join(name for name, on in zip(TARGETS, self.enable_lora) if on)


# ------------------------------------------------------------------------------------------ layer
class MergedLinear(nn.Module):
    """A frozen fused linear layer (no bias) plus LoRA updates on some of its row slices.

    `slice_sizes` are the output rows of each slice (Q, K, V); `enable_lora` says which are adapted.
    `weight` has nn.Linear's layout (out, in) and name. The LoRA parameters are created in the
    default dtype (fp32) even for a bf16 weight: the forward casts between the two.
    """

    def __init__(
        self, in_features: int, slice_sizes: tuple[int, int, int], r: int, alpha: float, dropout: float = 0.0,
        enable_lora: tuple[bool, bool, bool] = (True, False, True), device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(slice_sizes) != len(enable_lora) or not any(enable_lora):
            raise ValueError(f"enable_lora {enable_lora} must have one flag per slice {slice_sizes}, at least one true")
        self.in_features = in_features
        self.out_features = sum(slice_sizes)
        self.slice_sizes = tuple(slice_sizes)
        self.enable_lora = tuple(enable_lora)
        self.r = r
        self.scaling = alpha / r
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        n_enabled = sum(enable_lora)
        lora_rows = sum(size for size, on in zip(slice_sizes, enable_lora) if on)
        self.lora_A = nn.Parameter(torch.empty(r * n_enabled, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(lora_rows, r, device=device))
        self.reset_lora_parameters()
        # One dropout for all slices (as in lit-llama; PEFT draws one mask per target module).
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

        # For each enabled slice: its rows in the output, its rows in lora_A and in lora_B.
        self._lora_slices: list[tuple[slice, slice, slice]] = []
        out_start = b_start = 0
        for size, on in zip(slice_sizes, enable_lora):
            if on:
                a_start = len(self._lora_slices) * r
                self._lora_slices.append(
                    (slice(out_start, out_start + size), slice(a_start, a_start + r), slice(b_start, b_start + size))
                )
                b_start += size
            out_start += size

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, slice_sizes: tuple[int, int, int], r: int, alpha: float, dropout: float = 0.0,
        enable_lora: tuple[bool, bool, bool] = (True, False, True),
    ) -> MergedLinear:
        """Wrap `linear`: its weight Parameter is reused (no copy, values kept); fresh LoRA
        parameters are created on its device, in fp32."""
        if linear.bias is not None:
            raise ValueError("MergedLinear has no bias; the LLaMA projections it wraps have none")
        with torch.device("meta"):  # nothing allocated for a weight we are about to replace
            layer = cls(linear.in_features, slice_sizes, r, alpha, dropout, enable_lora)
        layer.weight = linear.weight
        layer.reset_lora_parameters(device=linear.weight.device, dtype=torch.get_default_dtype())
        return layer

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
        after_A = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)  # (B, T, r * n_enabled)
        # Add each slice's update into its own columns of y, in place: no zero-padded (B, T, out)
        # update is built (lit-llama scattered into one: ~7x slower forward, see howto/lora.md).
        for out_rows, a_rows, b_rows in self._lora_slices:
            update = (after_A[..., a_rows] @ self.lora_B[b_rows].T) * self.scaling  # (B, T, slice size)
            y[..., out_rows].add_(update.to(y.dtype))
        return y

    def delta_weights(self) -> list[tuple[slice, torch.Tensor]]:
        """Per enabled slice: its output rows and scaling * B_s @ A_s, computed in fp32."""
        return [
            (out_rows, (self.lora_B[b_rows].float() @ self.lora_A[a_rows].float()) * self.scaling)
            for out_rows, a_rows, b_rows in self._lora_slices
        ]

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
        targets = ",".join(name for name, on in zip(TARGETS, self.enable_lora) if on)
        return (
            f"in_features={self.in_features}, slice_sizes={self.slice_sizes}, r={self.r}, "
            f"scaling={self.scaling:g}, targets={targets}, merged={self.merged}"
        )


# ---------------------------------------------------------------------------------------- building
def add_lora(model: LLaMA, lora: LoRAConfig) -> LLaMA:
    """Replace every block's `attn.c_attn` with a MergedLinear around the same weight (in place;
    returns `model`). LoRA parameters are created on the weights' device, in fp32."""
    config = model.config
    hs = config.head_size
    slice_sizes = (config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs)  # Q, K, V rows
    for block in model.transformer.h:
        if isinstance(block.attn.c_attn, MergedLinear):
            raise ValueError("this model already has LoRA layers; build it from a plain LLaMA")
        block.attn.c_attn = MergedLinear.from_linear(
            block.attn.c_attn, slice_sizes, lora.r, lora.alpha, lora.dropout, lora.enable_lora
        )
    return model


def build_lora_model(config: LLaMAConfig, lora: LoRAConfig) -> LLaMA:
    """A LLaMA whose attention projections carry LoRA. Works under `with torch.device("meta"):`."""
    return add_lora(LLaMA(config), lora)


def lora_layers(model: nn.Module) -> list[MergedLinear]:
    return [m for m in model.modules() if isinstance(m, MergedLinear)]


def is_lora_key(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_SUFFIXES


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """requires_grad only for lora_A/lora_B; every base weight is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad = is_lora_key(name)


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
    costs what the base model costs. Undo with `unmerge_lora_weights`."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora_weights(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def load_lora_model(
    checkpoint_dir: Path | str, lora: LoRAConfig, dtype: torch.dtype | None = None,
    device: torch.device | str | None = None, lora_dtype: torch.dtype = torch.float32,
) -> LLaMA:
    """Load a base checkpoint into a LoRA model: base weights in `dtype` on `device`, LoRA freshly
    initialised there in `lora_dtype` (fp32 by default, also for a bf16 base). The checkpoint must
    hold exactly the base model's tensors: anything missing but the LoRA keys, or extra, is an error."""
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        lora_keys = set(lora_state_dict(build_lora_model(config, lora)))
    model = load_model(
        checkpoint_dir, dtype=dtype, device=device, model_fn=lambda c: build_lora_model(c, lora),
        allowed_missing=lora_keys,
    )
    # The assign-load left the LoRA parameters on the meta device: create them next to the weights.
    reset_lora_parameters(model, device=model.lm_head.weight.device, dtype=lora_dtype)
    return model


# ----------------------------------------------------------------------------------------- adapters
# The config fields that decide the base weights' shapes: an adapter fits a base iff these match.
SHAPE_FIELDS = (
    "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "n_query_groups", "intermediate_size",
    "tie_embeddings",
)
ADAPTER_FORMAT = "lit_llama.lora.v1"
RAW_ALPHA = 16.0  # lit-llama's lora_alpha, assumed for its adapters (which store no metadata)


def base_shape(config: LLaMAConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in SHAPE_FIELDS}


def base_fingerprint(config: LLaMAConfig) -> str:
    """sha256 of the JSON of the config's shape fields."""
    return hashlib.sha256(json.dumps(base_shape(config), sort_keys=True).encode()).hexdigest()


@dataclass
class AdapterMeta:
    """What an adapter file says about itself (None: not recorded, as in lit-llama adapters)."""

    lora: LoRAConfig
    prompt_style: str | None = None
    base_fingerprint: str | None = None
    base_config: dict[str, Any] | None = None


def save_adapter(
    model: LLaMA, path: Path | str, lora: LoRAConfig, base_config: LLaMAConfig | None = None,
    prompt_style: str | None = None,
) -> Path:
    """Write the LoRA tensors and what is needed to use them (r, alpha, dropout, targets, prompt
    style, the base's fingerprint) to a .safetensors file (metadata in its header) or a .pth file
    ({"lora": tensors, "meta": dict}). `base_config` defaults to `model.config`."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"adapter path {str(path)!r} must end in .safetensors or .pth")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; build it with build_lora_model or load_lora_model")
    if any(layer.r != lora.r or layer.enable_lora != lora.enable_lora for layer in layers):
        raise ValueError(
            f"the model's LoRA layers do not match the LoRAConfig given (r={lora.r}, targets {lora.targets}); "
            "pass the config the model was built with"
        )
    base_config = base_config or model.config
    meta = {
        "format": ADAPTER_FORMAT,
        "r": str(lora.r),
        "alpha": repr(float(lora.alpha)),
        "dropout": repr(float(lora.dropout)),
        "targets": lora.targets,
        "prompt_style": prompt_style or "",
        "base_fingerprint": base_fingerprint(base_config),
        "base_config": json.dumps(base_shape(base_config), sort_keys=True),
    }
    tensors = {k: v.detach().cpu() for k, v in lora_state_dict(model).items()}
    if path.suffix == ".safetensors":
        save_weights(tensors, path, metadata=meta)
    else:
        with atomic_path(path) as tmp:
            torch.save({"lora": {k: v.contiguous() for k, v in tensors.items()}, "meta": meta}, tmp)
    return path


def _meta_from_strings(meta: dict[str, str], path: Path) -> AdapterMeta:
    try:
        targets = set(meta["targets"].split(","))
        lora = LoRAConfig(
            r=int(meta["r"]), alpha=float(meta["alpha"]), dropout=float(meta["dropout"]),
            query="query" in targets, key="key" in targets, value="value" in targets,
        )
        base_config = json.loads(meta["base_config"]) if meta.get("base_config") else None
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path} has broken adapter metadata ({type(e).__name__}: {e}); save the adapter again") from None
    return AdapterMeta(lora, meta.get("prompt_style") or None, meta.get("base_fingerprint") or None, base_config)


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


def load_adapter(path: Path | str) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    """Read an adapter written by `save_adapter`, or a bare lit-llama LoRA state dict (with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist; pass the .lora.safetensors/.pth finetune wrote")
    meta_strings: dict[str, str] | None
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, "pt") as f:
                meta_strings = f.metadata() or None
            state_dict = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and set(obj) == {"lora", "meta"}:
                state_dict, meta_strings = obj["lora"], obj["meta"]
            else:
                state_dict, meta_strings = obj, None
    except Exception as e:  # a truncated file, a pickle with code in it, not an adapter at all
        raise ValueError(f"cannot read adapter {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{path} holds no tensors; is it an adapter?")
    others = [k for k in state_dict if not is_lora_key(k)]
    if others:
        raise ValueError(f"{path} is not a LoRA adapter: it holds non-LoRA tensors such as {others[0]!r}")
    # Safetensors files from elsewhere may carry metadata of their own (e.g. {"format": "pt"}).
    ours = bool(meta_strings) and str(meta_strings.get("format", "")).startswith("lit_llama.lora")
    meta = _meta_from_strings(meta_strings, path) if ours else _raw_meta(state_dict, path)
    return state_dict, meta


def _describe(shape: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def apply_adapter(model: LLaMA, path: Path | str) -> AdapterMeta:
    """Copy an adapter's tensors into `model`'s LoRA parameters (their dtype and device are kept).

    The model must be the base the adapter was trained on (checked by fingerprint when the file
    has one) and be built with the adapter's LoRAConfig: `load_lora_model(dir, meta.lora)`."""
    path = Path(path)
    state_dict, meta = load_adapter(path)
    if meta.base_fingerprint is not None and meta.base_fingerprint != base_fingerprint(model.config):
        ours = base_shape(model.config)
        theirs = meta.base_config or {}
        diff = [k for k in SHAPE_FIELDS if theirs.get(k) != ours[k]] or list(SHAPE_FIELDS)
        raise ValueError(
            f"{path.name} was trained for another base model ({_describe({k: theirs.get(k) for k in diff})}), "
            f"not this one ({_describe({k: ours[k] for k in diff})}); load the base checkpoint it was finetuned from"
        )
    layers = lora_layers(model)
    lora = meta.lora
    if not layers or any(layer.r != lora.r or layer.enable_lora != lora.enable_lora for layer in layers) or any(
        not math.isclose(layer.scaling, lora.scaling) for layer in layers
    ):
        raise ValueError(
            f"{path.name} needs a model with LoRA r={lora.r}, alpha={lora.alpha:g}, targets {lora.targets}; "
            "build it with load_lora_model(checkpoint_dir, meta.lora) from meta = load_adapter(path)[1]"
        )
    if any(layer.merged for layer in layers):
        raise ValueError("the model's LoRA weights are merged; call unmerge_lora_weights(model) before applying an adapter")
    params = dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    if set(state_dict) != expected:
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        raise ValueError(f"{path.name} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"{path.name} does not fit the model: {name} is {tuple(tensor.shape)}, the model has {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
    return meta
